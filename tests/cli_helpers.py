"""`python -m maverick_ray.cli ARGS` run inside the test process, for the CLI runs that start no
Ray: the same exit status, stdout and stderr a subprocess gives, without the 4-10 s a subprocess
spends starting the interpreter and importing torch and the model code again.

What a subprocess would show is kept: the exit status of `sys.exit(main())` (argparse's
SystemExit included), an uncaught exception as status 1 with its traceback on stderr, and what
the CLI logs at WARNING (its logging.basicConfig level) on stderr. Runs that start Ray (--ep > 1,
serve) stay subprocesses: Ray would outlive the call in this process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import traceback
from unittest import mock


def run_cli_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    from maverick_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    verbose = "-v" in args or "--verbose" in args
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=err)
            except Exception:
                traceback.print_exc(file=err)
                rc = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["maverick-ray", *args], rc or 0, out.getvalue(), err.getvalue())
