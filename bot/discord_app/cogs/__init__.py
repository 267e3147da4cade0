"""Discord cogs, one per command family, each built with the Studio it calls."""
