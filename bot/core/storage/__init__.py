"""The bot's SQLite file: store.py (one connection, generations and settings), schema.py (the migrations and how
they are applied), preset_table.py, safety_table.py, records.py (the rows as dataclasses and their states),
params.py (an /imagine's params, versioned)."""
