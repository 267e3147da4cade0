"""The transport-free core: the Studio and its services, request parsing, results and cards as plain data and text.

Front ends (bot/discord_app/, bot/console/) depend on it; it never imports `discord` or a front end.
"""
