"""`toyworld`: a small text-to-image model of a drawn toy world, pretrained by this project.

world.py draws and captions the world, pretrain.py trains the model from it, similarity.py
scores how much images look like a concept. `python -m amxtune_trainer.toyworld --help`.
"""
