"""What Noodle shows, as plain data and text both front ends render: card.py (the `Card` and shared lines),
result.py (/imagine's result card, status, failure and history lines), workflow.py (a /workflow result's card),
summary.py (a queued ticket's line), details.py (ℹ️)."""
