"""A result card as a Discord embed: the same words as the console's text (bot/core/cards/), in Discord's shape."""

from __future__ import annotations

import discord

from bot.core.cards.card import Card, truncate

__all__ = ["to_embed"]


def to_embed(card: Card) -> discord.Embed:
    """The card as a Discord embed (inline fields for the short values)."""
    embed = discord.Embed(title=truncate(card.title, 256), description=card.description, colour=0xE8A33D)
    for name, value in card.fields:
        embed.add_field(name=name, value=truncate(value, 1024) or "–",
                        inline=name not in ("Negative", "Cached", "Tokens", "Seed"))
    embed.set_footer(text=truncate(card.footer, 2048))
    return embed
