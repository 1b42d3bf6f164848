"""The CLI lists every subcommand, and one whose module cannot import stops it with a clear error
(it used to vanish from ``llmopt --help`` silently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from llmopt.cli import _COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand():
    out = CliRunner().invoke(app, ["--help"]).output
    for name, _, _ in _COMMANDS:
        assert name in out, f"{name} missing from llmopt --help"


def test_a_subcommand_that_cannot_import_fails_loudly():
    # a real interpreter whose import of llmopt.serve.cli fails (as if fastapi were missing)
    code = ("import sys; sys.modules['llmopt.serve.cli'] = None\n"
            "import llmopt.cli\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "CommandImportError" in r.stderr and "'serve' command cannot be loaded" in r.stderr
    assert "llmopt.serve.cli" in r.stderr
