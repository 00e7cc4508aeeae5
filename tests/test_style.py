"""The code base stays ruff-clean (lint and format), as the contributing rules require."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_and_format():
    for args in (["check", "src", "tests", "scripts"], ["format", "--check", "src", "tests", "scripts"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_entry_point_imports_the_cli():
    """bench/ and serve/ build engines from EngineArgs; importing cli.py from them made an import cycle."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "src" / "megatier").rglob("*.py")
        if p.name != "__main__.py" and "from megatier.cli import" in p.read_text()
    ]
    assert offenders == []
