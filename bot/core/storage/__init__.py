"""The bot's SQLite file: store.py (one connection, migrations, generations and settings), preset_table.py,
records.py (the rows as dataclasses and their states), params.py (an /imagine's params, versioned)."""
