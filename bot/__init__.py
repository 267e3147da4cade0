"""Noodle's bot side, in the order a request passes it:

- core/: transport-free, never imports `discord` (a layout test holds it to that):
  - studio.py: `Studio`, the services a front end holds, built with explicit dependencies;
  - requests/: options -> a checked request -> `WorkflowParams` (names, prompt expansion, uploads, workflows);
  - services/: one class per concern (generations, workflows, presets, /settings, the queue, models);
  - results/: engine events -> stored verdict -> a front end's `Publisher`; progress, retention;
  - cards/: what a result, a ticket and ℹ️ details say, as plain data and text;
  - storage/: the SQLite store, its rows, presets table and versioned params;
  - front_end.py: the values front ends and services pass each other;
  - presets.py: a server preset as data: checked, layered under /imagine's options, shown as a line;
  - errors.py: the bot's own `NoodleError`s (what a person is told);
- discord_app/: the Discord front end (client, connecting, cogs, posting, embeds, its bench);
- console/: `noodle chat`, the local front end;
- cli.py and settings.py: the `noodle` command and config.toml.
"""
