"""What a `--model` or `--data` string names. One place decides; every entry point asks here.

    openai:text-embedding-3-small     the OpenAI API (or a compatible server), as a baseline
    out/                              a saved sentence-transformers folder, such as a run's --out
    ./my-encoder/                     a pretrained encoder's folder
    BAAI/bge-base-en-v1.5             a name on the Hugging Face hub
"""
from __future__ import annotations

import re
from pathlib import Path

OPENAI = "openai:"


def model_kind(name: str) -> str:
    """'openai', 'saved' (loaded whole, its projection and threshold too), 'folder' (an encoder that
    gets our pooling and a fresh projection) or 'hub'. A path that does not exist is a 'folder' when
    it looks like a path (absolute, or starting with '.'), so that a typo is named as a missing folder."""
    if name.startswith(OPENAI):
        return "openai"
    path = Path(name)
    if (path / "modules.json").is_file():
        return "saved"
    if path.exists() or path.is_absolute() or name.startswith("."):
        return "folder"
    return "hub"


def is_hub_id(name: str) -> bool:
    """'org/name' that is no local file or folder."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".") and not Path(name).exists()
