"""`make setup` checks the interpreter before pip: kaggle 2.2.x needs Python >= 3.11.

The Makefile is copied into tmp_path beside an empty pyproject.toml and run with a PATH that holds
only fake interpreters (scripts that report another version), so nothing is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")


def fake_python(bin_dir: Path, name: str, version: tuple[int, int, int]) -> Path:
    """A script that runs `-c CODE` like the given Python version would answer version questions."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"sys.version_info = ({version[0]}, {version[1]}, {version[2]}, 'final', 0)\n"
        f"sys.version = '{'.'.join(map(str, version))} (fake)'\n"
        "if sys.argv[1:2] != ['-c']:\n    sys.exit('fake python: only -c CODE')\n"
        "exec(sys.argv[2])\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


def make(tmp_path: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    return subprocess.run(
        [MAKE, "-C", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )


def test_setup_stops_on_python_310_naming_it(tmp_path: Path) -> None:
    fake = fake_python(tmp_path / "bin", "python3", (3, 10, 12))
    out = make(tmp_path, tmp_path / "bin", "setup")
    assert out.returncode != 0
    assert "needs Python >= 3.11" in out.stderr
    assert f"python3 ({fake}): Python 3.10.12" in out.stderr  # what it found
    assert "apt install python3.11" in out.stderr and "PYTHON=" in out.stderr  # what to do
    assert not (tmp_path / ".venv").exists() and "-m pip" not in out.stdout + out.stderr


def test_setup_stops_on_an_explicit_old_python(tmp_path: Path) -> None:
    fake_python(tmp_path / "bin", "python3.12", (3, 12, 1))
    old = fake_python(tmp_path / "old", "python", (3, 10, 4))
    out = make(tmp_path, tmp_path / "bin", "setup", f"PYTHON={old}")
    assert out.returncode != 0 and f"{old} ({old}): Python 3.10.4" in out.stderr


def test_setup_stops_when_no_python_is_on_path(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    out = make(tmp_path, tmp_path / "bin", "setup")
    assert out.returncode != 0 and "none: no python3.13 python3.12 python3.11 python3 on PATH" in out.stderr


def test_setup_picks_the_first_python_311_or_newer(tmp_path: Path) -> None:
    fake_python(tmp_path / "bin", "python3", (3, 10, 12))
    fake_python(tmp_path / "bin", "python3.12", (3, 12, 1))
    out = make(tmp_path, tmp_path / "bin", "-n", "setup")  # -n: print the recipe, install nothing
    assert out.returncode == 0, out.stderr
    assert "python3.12 -m venv .venv" in out.stdout


def test_pyproject_declares_python_311() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["requires-python"] == ">=3.11"
