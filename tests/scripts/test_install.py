"""What installing gives: extras whose names every pip matches, a test command that installs every extra and
fails under CI=true when one is missing, and commands that run from any folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_extra_names_are_written_as_pip_normalises_them():
    """Wrong if an extra is spelled with "_" or capitals: setuptools writes it normalised ("lm-eval") into the
    package's metadata, and pip before 23.3 (Python 3.11's own is 23.2) compares `.[lm_eval]` with that
    literally, warns that the extra does not exist, and installs nothing of it."""
    for name in PROJECT["optional-dependencies"]:
        assert name == re.sub(r"[-_.]+", "-", name).lower(), name


def test_the_test_command_installs_every_extra():
    """Wrong if scripts/test.sh leaves out an extra (its tests would be skipped, or fail under CI) or names
    one pyproject.toml does not define (pip only warns)."""
    line = re.search(r"^setup_env (\S+)$", (REPO / "scripts" / "test.sh").read_text(), re.MULTILINE)
    assert set(line.group(1).split(",")) == set(PROJECT["optional-dependencies"])


def test_a_missing_optional_package_fails_under_ci(tmp_path):
    """Wrong if, under CI=true, a test or a whole module skipped by `pytest.importorskip` passes the run (the
    lm-eval tests were skipped unnoticed that way), or if, outside CI, such a test does not skip."""
    (tmp_path / "test_module_level.py").write_text(
        "import pytest\npytest.importorskip('no_such_package_x')\n\ndef test_a():\n    pass\n")
    (tmp_path / "test_in_test.py").write_text(
        "import pytest\n\ndef test_b():\n    pytest.importorskip('no_such_package_y')\n\n"
        "def test_c():\n    pass\n")
    for name in ("test_module_level.py", "test_in_test.py"):
        results = {}
        for ci in ("true", ""):
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                       "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), str(tmp_path / name)]
            run = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "CI": ci, "PYTHONPATH": str(REPO)})
            results[ci] = (run.returncode, run.stdout)
        assert results["true"][0] != 0 and "under CI=true" in results["true"][1], (name, results["true"][1])
        assert results[""][0] in (0, 5) and "skipped" in results[""][1], (name, results[""][1])  # 5: none ran


@pytest.mark.parametrize("command", sorted(PROJECT["scripts"]))
def test_commands_run_from_another_folder(tmp_path, command):
    """Wrong if an installed command's entry point does not resolve, or needs the repository as the current
    folder (the package, not scripts/, must hold the code)."""
    module, attribute = PROJECT["scripts"][command].split(":")
    code = f"import sys; sys.argv = [{command!r}, '--help']; from {module} import {attribute}; {attribute}()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout.lower()


@pytest.mark.parametrize("command", sorted(PROJECT["scripts"]))
def test_scripts_call_the_same_code(command):
    """Wrong if `python scripts/<name>.py` and the installed command run different code."""
    module, attribute = PROJECT["scripts"][command].split(":")
    shim = (REPO / "scripts" / f"{module.rsplit('.', 1)[1]}.py").read_text()
    assert f"from {module} import {attribute}" in shim
