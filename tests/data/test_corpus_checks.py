"""Malformed corpora and unusable data folders: one `error:` line naming the file and the fix, exit 2, from
`python -m data.prepare` and from `train.py` with `data.auto_prepare=true`, and nothing left behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import UserError
from data.prepare import prepare
from tests.hydra_compose import run_train_py, tiny_run

REPO = Path(__file__).resolve().parents[2]
TEXT = "Some words of a document, long enough to be a document. " * 20


def good_jsonl(path, count=30):
    path.write_text("".join(json.dumps({"text": f"{i} {TEXT}"}) + "\n" for i in range(count)))


def binary_txt(root):
    for i in range(10):
        (root / f"{i}.txt").write_text(f"{i} {TEXT}", encoding="utf-8")
    (root / "7.txt").write_bytes(bytes(range(256)) * 40)  # a binary file named .txt
    return str(root / "*.txt"), [f"{root / '7.txt'} is not UTF-8 text (byte 0x80 at offset 128)",
                                 "Remove it from data.files or convert it to UTF-8"]


def garbage_jsonl(root):
    good_jsonl(root / "a.jsonl")
    (root / "b.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + "{garbage: not json\n")
    return str(root / "*.jsonl"), [f"{root / 'b.jsonl'} line 2 is not JSON",
                                   "fix or remove it from data.files"]


def jsonl_without_field(root):
    good_jsonl(root / "a.jsonl")
    (root / "b.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"body": TEXT}) + "\n")
    return str(root / "*.jsonl"), [f"{root / 'b.jsonl'} line 2 has no field 'text' (fields: ['body'])",
                                   "set data.text_field"]


def parquet_without_field(root):
    pq.write_table(pa.table({"text": [f"{i} {TEXT}" for i in range(30)]}), root / "a.parquet")
    pq.write_table(pa.table({"text": [TEXT, None, TEXT]}), root / "b.parquet")
    return str(root / "*.parquet"), [f"{root / 'b.parquet'} row 1 has no text in 'text' (null)"]


def unreadable_parquet(root):
    pq.write_table(pa.table({"text": [f"{i} {TEXT}" for i in range(30)]}), root / "a.parquet")
    (root / "b.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    return str(root / "*.parquet"), [f"{root / 'b.parquet'} is not a readable Parquet file",
                                     "re-create it or remove it from data.files"]


CORPORA = {"binary-txt": binary_txt, "garbage-jsonl": garbage_jsonl,
           "jsonl-without-field": jsonl_without_field, "parquet-without-field": parquet_without_field,
           "unreadable-parquet": unreadable_parquet}


def cli(*overrides, cwd=REPO, prefix=()):
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*prefix, sys.executable, "-m", "data.prepare", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(code, stderr, expected):
    """Exit 2 and one `error:` line holding every expected piece, no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])


def text_overrides(files, data_dir, cache):
    return ["data=text", f"data.files={files}", f"data.dir={data_dir}", f"data.cache_dir={cache}",
            "data.tokenizer=byte"]


@pytest.mark.parametrize("corpus", CORPORA)
def test_malformed_corpus_is_one_line_from_data_prepare(corpus, tmp_path):
    """Wrong if a malformed corpus (the issue's probes) ends `python -m data.prepare` in a traceback, names
    no file, or leaves a token file behind."""
    (tmp_path / "corpus").mkdir()
    files, expected = CORPORA[corpus](tmp_path / "corpus")
    result = cli(*text_overrides(files, tmp_path / "out", tmp_path / "hf"))
    assert_one_line(result.returncode, result.stderr, expected)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("corpus", CORPORA)
def test_malformed_corpus_is_one_line_from_train_py_and_leaves_no_run_folder(corpus, tmp_path, capsys,
                                                                             monkeypatch):
    """Wrong if train.py with data.auto_prepare=true meets a malformed corpus with a traceback, or leaves an
    out_dir holding only plan.txt and train.log (the issue's probe)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    files, expected = CORPORA[corpus](tmp_path / "corpus")
    capsys.readouterr()
    code = run_train_py(tiny_run(tmp_path / "run", tmp_path / "data", "data.source=files", "data.name=text",
                                 f"data.files={files}", f"+data.cache_dir={tmp_path / 'hf'}",
                                 "data.auto_prepare=true", "data.val_fraction=0.1"))
    assert_one_line(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())


def test_data_dir_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    """Wrong if a data.dir that is a regular file gives a FileExistsError traceback from mkdir."""
    good_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "file").write_text("")
    expected = [f"data.dir {tmp_path / 'file'} is a file, not a folder", "set data.dir to a folder"]
    result = cli(*text_overrides(tmp_path / "a.jsonl", tmp_path / "file", tmp_path / "hf"))
    assert_one_line(result.returncode, result.stderr, expected)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = run_train_py(tiny_run(tmp_path / "run", tmp_path / "file", "data.auto_prepare=true"))
    assert_one_line(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "run").exists()


def test_data_dir_below_a_missing_folder_is_refused_outside_the_working_directory(tmp_path):
    """Wrong if a data.dir under a path that does not exist (a typo, an unmounted disk) is silently created
    and filled, or if the default data_cache/<name> under the working directory is not created."""
    good_jsonl(tmp_path / "a.jsonl")
    missing = tmp_path / "no_such_disk" / "corpus"
    result = cli(*text_overrides(tmp_path / "a.jsonl", missing, tmp_path / "hf"))
    assert_one_line(result.returncode, result.stderr, [
        f"data.dir {missing} is below {missing.parent}, which does not exist",
        f"create it first (mkdir -p {missing.parent})"])
    assert not missing.parent.exists()
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"name": "text", "source": "files", "files": str(tmp_path / "a.jsonl"), "text_field": "text",
           "tokenizer": "byte", "val_fraction": 0.1, "split_seed": 1, "num_proc": 1,
           "cache_dir": str(tmp_path / "hf"), "dir": "data_cache/text_byte"}
    cwd = Path.cwd()
    os.chdir(work)
    try:
        assert (prepare(cfg) / "meta.json").is_file()
    finally:
        os.chdir(cwd)


def read_only(folder: Path) -> list[str]:
    """A command prefix under which `folder` cannot be written: a read-only bind mount in a user namespace
    for root (who may write anywhere), nothing for other users (the folder is made 0555)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    prefix = ["unshare", "-rm", "sh", "-c",
              f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$0" "$@"']
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here (no user namespaces)")
    return prefix


def test_read_only_data_dir_is_one_line_before_any_work(tmp_path):
    """Wrong if a data.dir that cannot be written gives a PermissionError/OSError traceback, or is found
    only after the corpus was read and tokenised."""
    good_jsonl(tmp_path / "a.jsonl")
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = read_only(locked)
    result = cli(*text_overrides(tmp_path / "a.jsonl", locked, tmp_path / "hf"), prefix=prefix)
    assert_one_line(result.returncode, result.stderr, [f"cannot write into data.dir {locked}",
                                                       "set data.dir to a folder you can write"])
    assert not (tmp_path / "hf").exists(), "the corpus was read before the folder was checked"
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([*prefix, sys.executable, str(REPO / "train.py"),
                             *tiny_run(tmp_path / "run", locked, "data.auto_prepare=true")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert_one_line(result.returncode, result.stderr, [f"cannot write into data.dir {locked}"])
    assert not (tmp_path / "run").exists()


def test_in_process_errors_are_user_errors(tmp_path):
    """The same refusals raised to a caller of data.prepare.prepare (the trainer) as UserError."""
    (tmp_path / "corpus").mkdir()
    files, _ = binary_txt(tmp_path / "corpus")
    cfg = {"name": "text", "source": "files", "files": files, "text_field": "text", "tokenizer": "byte",
           "val_fraction": 0.1, "split_seed": 1, "num_proc": 1, "dir": str(tmp_path / "out")}
    with pytest.raises(UserError, match="is not UTF-8 text"):
        prepare(cfg)
