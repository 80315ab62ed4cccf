"""embed-ft's modules under one name of their own, so that none of them can collide with a module of
yours called `data`, `model` or `errors`:

    from embed_ft.model import load_model
    from embed_ft import corpus, evaluate

The files stay flat at the repository root, where you read them (`python train.py` runs as it
always has); this package's path is that folder, so `embed_ft.model` is the root's model.py.
An install (`pip install -e .`) puts this one name on your path and no other.
"""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]
