"""Repository checks that belong to the test suite: style (ruff) and hygiene."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_import_contracts_hold() -> None:
    """The arrows of docs/design.md, as the import-linter contracts in pyproject.toml."""
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[test]')")
    res = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" not in res.stdout.lower().replace("0 broken", ""), res.stdout


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line.split("'")[1] for line in ci.splitlines() if line.startswith("TEST_CMD="))
    first_blocks = text.split("## ")[0]
    assert "widesparse reproduce --scale tiny" in first_blocks  # the main job
    assert test_cmd in first_blocks
    assert first_blocks.index("pip install torch==2.13.0") < first_blocks.index("pip install -e")
