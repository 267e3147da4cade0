"""The Studio's services, one class per concern, each given what it needs: models.py (what can be asked for),
user_settings.py (/settings), server_presets.py (presets and /imagine's layering), preset_lookup.py (a server's
preset by name, for both), queue.py (into the engine's queue, /queue), workflows.py (/workflow),
generations.py (/imagine, 🔁, 🔀, 🗑️, ℹ️, /history), access.py (who may see or change a result)."""
