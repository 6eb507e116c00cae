"""The trainer: config tree (`config.py`), model and token windows (`data.py`), the
training loop (`loop.py`) and crash-safe checkpoints (`checkpoint.py`)."""
