"""``trl-rb run script.py [args...]``: run an unmodified trl script with trl-rb's trainers (``trl_rb.patch_trl()``
first, then the script as ``__main__`` with ``args`` as its command line)."""

from __future__ import annotations

import os
import runpy
import sys

from .patch import patch_trl


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"trl-rb run: no such script {script!r}.", file=sys.stderr)
        return 2
    patch_trl()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0
