"""The code passes ruff as pyproject.toml configures it: no unused or undefined names, no syntax errors, imports in order."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    assert importlib.util.find_spec("ruff"), "ruff is not installed: pip install -e \".[train,dev]\" (the README's install) brings it"
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff found problems (fix them, or run `ruff check --fix .`):\n{result.stdout}{result.stderr}"
