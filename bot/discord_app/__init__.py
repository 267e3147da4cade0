"""The Discord front end: client.py (the bot, its start-up and command sync), connect.py (logging in with
backoff), cogs/ (one per command family), post.py (results as channel messages, status sinks), embeds.py (cards
as embeds), bench.py (`noodle bench bot`)."""
