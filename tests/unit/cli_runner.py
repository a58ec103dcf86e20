"""Run the ``loraplex`` command in-process, as a user would, for the CLI tests."""

from __future__ import annotations

import sys

import pytest

from loraplex.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``loraplex ARGS`` in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["loraplex", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
