"""One module per training method (a recipe: what is trainable, its prompts, its outputs) over
the method-free engine (engine.py). How to add one, and what a recipe may import:
docs/architecture.md."""
