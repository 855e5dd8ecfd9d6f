"""Running the ``innersight`` command line inside a test process."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence


def run_cli(*args: str | Sequence[str]) -> tuple[int, str, str]:
    """Run ``innersight ARGS`` in this process: ``(exit code, stdout, stderr)``.

    ``args`` are the words of the command line, given one by one or as one list."""
    from ..cli import main

    words = list(args[0]) if len(args) == 1 and not isinstance(args[0], str) else [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(words)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
