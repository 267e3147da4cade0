"""`noodle chat`: the local console front end over the same Studio (app.py), and its /preset, /settings and /queue
lines (commands.py)."""
