"""Every path option of every entry point, checked in one place before any work is done.

An option says what it takes by its metavar, and `parse` checks each one right after argparse:

    FILE    an existing file                      OUT     a file to write (not a folder; no parent is a file)
    DIR     an existing folder                    OUTDIR  a folder to write into (not a file; no parent is a file)
    PAIRS   an existing file or folder            DATA    a pairs file, or a dataset name on the hub
    MODEL   a model folder, a hub name, or openai:NAME

A wrong kind is one `error:` line naming the option, the path and what it must be (exit code 2),
before anything is read or written. tests/test_paths.py walks every entry point's parser and tries
each wrong kind on each such option, so a new path option is covered the day it is added.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from embed_ft import data
from embed_ft.errors import InputError
from embed_ft.sources import is_hub_id, model_kind

KINDS = ("FILE", "DIR", "PAIRS", "OUT", "OUTDIR", "DATA", "MODEL")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse's parse_args, then every path option checked against its metavar."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        if action.metavar in KINDS and getattr(args, action.dest, None):
            values = getattr(args, action.dest)
            for value in values if isinstance(values, list) else [values]:
                check(action.option_strings[0] if action.option_strings else action.dest, str(value), action.metavar)
    return args


def check(option: str, value: str, kind: str) -> None:
    """One path against what its option takes."""
    path = Path(value)
    blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise InputError(f"{option} {value}: {blocked} is a file, not a folder")
    if kind == "FILE" or (kind == "DATA" and looks_like_a_file(value)):
        if path.is_dir():
            raise InputError(f"{option} {value} is a folder; it takes a file")
        if not path.is_file():
            raise InputError(f"{option} {value}: file not found")
    elif kind == "DIR":
        if path.exists() and not path.is_dir():
            raise InputError(f"{option} {value} is a file; it takes a folder")
        if not path.is_dir():
            raise InputError(f"{option} {value}: folder not found")
    elif kind == "PAIRS" and not path.exists():
        raise InputError(f"{option} {value}: no such file or folder")
    elif kind == "OUT" and path.is_dir():
        raise InputError(f"{option} {value} is a folder; it takes the name of a file to write")
    elif kind == "OUTDIR" and path.exists() and not path.is_dir():
        raise InputError(f"{option} {value} is a file; it takes a folder to write into")
    elif kind == "MODEL" and model_kind(value) != "openai":
        if path.exists() and not path.is_dir():
            raise InputError(f"{option} {value} is a file; it takes a model folder (or a hub name)")
        if model_kind(value) == "folder" and not path.is_dir():
            raise InputError(f"{option} {value}: model folder not found")


def looks_like_a_file(value: str) -> bool:
    """A --data value that names a local file rather than a hub dataset (as data.load_pairs reads it)."""
    return Path(value).exists() or Path(value).suffix in data.LOCAL_SUFFIXES or (
        "/" in value and not is_hub_id(value))
