"""Exports are built in a staging folder (or file) of their own beside --out and renamed when complete: a
user's files are never touched, an --out of the wrong kind is one line, and a full disk (a file-size limit,
failing the write at the OS call as ENOSPC does) is one line with nothing left behind."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, byte_data) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train(compose_train(tiny_run(out, byte_data, steps=2, interval=2)))
    return out


def export(script: str, run: Path, out: Path, file_size_limit: int | None = None
           ) -> subprocess.CompletedProcess:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, str(REPO / "scripts" / script), str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)),
                          preexec_fn=limit if file_size_limit else None)


def one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(text in lines[0] for text in expected), lines[0]


def test_export_hf_never_touches_a_users_tmp_folder(run, tmp_path):
    """The issue: `export_hf --out X` deleted the user's existing `X.tmp/` without a word."""
    pytest.importorskip("transformers")
    users = tmp_path / "model.tmp"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    result = export("export_hf.py", run, tmp_path / "model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (users / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp"], "a staging folder was left"


def test_export_hf_refuses_an_out_that_is_a_file(run, tmp_path):
    """The issue: --out at an existing file gave a traceback."""
    pytest.importorskip("transformers")
    existing = tmp_path / "model"
    existing.write_text("a file")
    one_error_line(export("export_hf.py", run, existing), f"{existing} is a file")
    assert existing.read_text() == "a file"


@pytest.mark.parametrize("script", ["export_hf.py", "export_checkpoint.py"])
def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(script, run, tmp_path):
    """A file-size limit below the weights' size: wrong if that is a traceback, or leaves a staging folder or
    file, or a partial export under --out."""
    if script == "export_hf.py":
        pytest.importorskip("transformers")
    out = tmp_path / "exports" / ("model" if script == "export_hf.py" else "model.pt")
    one_error_line(export(script, run, out, file_size_limit=100_000), f"cannot write {out.parent}",
                   "File too large", "free disk space")
    assert list(out.parent.iterdir()) == [], "something was left behind"


def test_export_checkpoint_refuses_an_out_that_is_a_folder(run, tmp_path):
    one_error_line(export("export_checkpoint.py", run, tmp_path), f"--out {tmp_path} is a directory")
