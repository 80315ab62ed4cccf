"""What every command-line entry point shares: bad input is one line, not a traceback.

    python train.py --batch-size 0
    error: --batch-size must be at least 1 (got 0)          (exit code 2; --debug shows the traceback)
"""
from __future__ import annotations

import sys
from typing import Callable


class InputError(ValueError):
    """Bad input: a data file, an option, a model folder. The entry points print its message on one
    line, starting with 'error:', and exit with code 2."""


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call `main(argv)`. Bad input exits with code 2 and one line on stderr; a run that stopped on a
    numerical problem exits with 1, an interrupted one with 130. `--debug` in argv shows tracebacks."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (InputError, FloatingPointError) as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


def first_line(error: Exception) -> str:
    """An exception's message, cut to its first line: enough to say what went wrong in one line."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
