"""Noodle's front ends: the transport-free Studio (service.py) with its request model, store and embeds;
the Discord client and cogs; the `noodle chat` console; the `noodle` CLI."""
