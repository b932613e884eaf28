"""Data preparation: token files must hold every document intact, split by documents, written atomically."""

import glob
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from omegaconf import OmegaConf

import data.prepare as prep
import data.token_writer as token_writer
from common.errors import UserError
from data.loader import TokenData
from data.prepare import prepare, unprepared_reason

REPO = Path(__file__).resolve().parents[2]
GPT2 = tiktoken.get_encoding("r50k_base")
DOCS = [
    f"Document {i}: "
    + "naïve café, 東京 🎭 " * (i % 4)
    + "line\n" * i
    + "<|endoftext|> is text" * (i % 3 == 0)
    for i in range(20)
]


def data_cfg(tmp_path, name="text", **overrides):
    """The shipped data config `name` with the output (and any datasets cache) under tmp_path."""
    cfg = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    tmp_path.mkdir(parents=True, exist_ok=True)  # data.dir's parent must exist (outside the working dir)
    cfg.dir = str(tmp_path / "out")
    if "cache_dir" in cfg:
        cfg.cache_dir = str(tmp_path / "hf")
    return OmegaConf.merge(cfg, overrides)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"title": f"t{i}", "text": d}) + "\n" for i, d in enumerate(docs)))


def read_documents(path, eot_id, decode):
    """Cut a .bin file at its EOT tokens and decode each piece; the file must end with EOT."""
    tokens = np.fromfile(path, dtype="<u2")
    assert tokens[-1] == eot_id
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def decode_bytes(ids):
    return bytes(ids).decode()


def test_jsonl_corpus_with_gpt2_holds_every_document_once(tmp_path):
    """Otherwise documents are lost, duplicated, altered, not EOT-terminated, or miscounted in meta.json."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = prepare(data_cfg(tmp_path, files=str(tmp_path / "*.jsonl"), val_fraction=0.2))
    train = read_documents(out / "train.bin", 50256, GPT2.decode)
    val = read_documents(out / "val.bin", 50256, GPT2.decode)
    assert sorted(train + val) == sorted(DOCS)
    assert len(val) == math.ceil(0.2 * len(DOCS))
    expected_tokens = sum(len(GPT2.encode_ordinary(d)) + 1 for d in DOCS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == expected_tokens
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (
        len(train),
        len(val),
    )
    assert os.path.getsize(out / "val.bin") == 2 * meta["splits"]["val"]["tokens"]


def test_txt_json_and_parquet_files_with_byte_tokenizer(tmp_path):
    """Otherwise a file type is read wrongly: a .txt file must be one document, a record of .json or .parquet
    one document each; the byte tokenizer's token count is the UTF-8 length plus one EOT."""
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(DOCS[:8]):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in DOCS[8:14]]))
    pq.write_table(pa.table({"text": DOCS[14:]}), tmp_path / "c.parquet")
    files = [str(tmp_path / "txt" / "*.txt"), str(tmp_path / "b.json"), str(tmp_path / "*.parquet")]
    out = prepare(data_cfg(tmp_path, files=files, tokenizer="byte", val_fraction=0.25))
    docs = read_documents(out / "train.bin", 0, decode_bytes) + read_documents(
        out / "val.bin", 0, decode_bytes
    )
    assert sorted(docs) == sorted(DOCS)
    total = os.path.getsize(out / "train.bin") + os.path.getsize(out / "val.bin")
    assert total == 2 * sum(len(d.encode()) + 1 for d in DOCS)


def test_split_is_by_documents_and_fixed_by_the_seed(tmp_path):
    """Otherwise the validation set changes between preparations, or depends on nothing the user controls."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    files = str(tmp_path / "corpus.jsonl")
    a = prepare(data_cfg(tmp_path / "a", files=files, tokenizer="byte", val_fraction=0.2))
    b = prepare(data_cfg(tmp_path / "b", files=files, tokenizer="byte", val_fraction=0.2))
    c = prepare(data_cfg(tmp_path / "c", files=files, tokenizer="byte", val_fraction=0.2, split_seed=1))
    for name in ("train.bin", "val.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    val_a, val_c = (set(read_documents(d / "val.bin", 0, decode_bytes)) for d in (a, c))
    assert val_a != val_c and len(val_a) == len(val_c) == 4
    assert not val_a & set(read_documents(a / "train.bin", 0, decode_bytes))


def test_meta_json_records_format_and_provenance(tmp_path):
    """Otherwise the loader, or a person, cannot tell how the files were made."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = prepare(data_cfg(tmp_path, files=str(tmp_path / "corpus.jsonl"), val_fraction=0.1, split_seed=7))
    meta = json.loads((out / "meta.json").read_text())
    assert {k: meta[k] for k in ("format_version", "tokenizer", "vocab_size", "eot_id", "dtype")} == {
        "format_version": 1,
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_id": 50256,
        "dtype": "uint16",
    }
    assert (meta["val_fraction"], meta["split_seed"]) == (0.1, 7)
    assert meta["source"]["kind"] == "files" and meta["source"]["num_files"] == 1
    assert meta["splits"]["val"]["documents"] == 2 and len(meta["fingerprint"]) == 64


def test_rerun_with_same_settings_does_nothing_and_other_settings_are_refused(tmp_path):
    """Otherwise a rerun redoes hours of work, or silently overwrites prepared data with other settings."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    cfg = data_cfg(tmp_path, files=str(tmp_path / "corpus.jsonl"), tokenizer="byte", val_fraction=0.2)
    out = prepare(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert unprepared_reason(cfg) is None
    assert prepare(cfg) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(UserError, match=re.escape("val_fraction: 0.2 on disk, 0.5 requested")):
        prepare(OmegaConf.merge(cfg, {"val_fraction": 0.5}))


def test_interrupted_preparation_is_refused_then_completed(tmp_path, monkeypatch):
    """Otherwise a killed preparation leaves files the loader trains on, or blocks the rerun."""
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    cfg = data_cfg(tmp_path, files=str(tmp_path / "corpus.jsonl"), tokenizer="byte", val_fraction=0.2)
    write_split = prep._write_split

    def killed_at_val(batches, path, *args):
        if path.name == "val.bin":
            path.with_name("val.bin.tmp").write_bytes(b"\x01\x02\x03")  # a half-written file
            raise KeyboardInterrupt
        return write_split(batches, path, *args)

    monkeypatch.setattr(prep, "_write_split", killed_at_val)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not (tmp_path / "out" / "meta.json").exists() and unprepared_reason(cfg) is not None
    with pytest.raises(UserError, match=re.escape("python -m data.prepare")):
        TokenData(tmp_path / "out")
    monkeypatch.setattr(prep, "_write_split", write_split)
    out = prepare(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    docs = read_documents(out / "train.bin", 0, decode_bytes) + read_documents(
        out / "val.bin", 0, decode_bytes
    )
    assert sorted(docs) == sorted(DOCS)


@pytest.mark.parametrize(
    ("tokenizer", "count_tokens"),
    [
        ("byte", lambda text: len(text.encode())),
        ("gpt2", lambda text: len(GPT2.encode_ordinary(text))),
    ],
)
def test_shipped_shakespeare_sample_prepares(tmp_path, tokenizer, count_tokens):
    """Otherwise the quick start, which trains on the shipped sample without a download, breaks."""
    works = [
        json.loads(line)["text"]
        for line in (REPO / "data" / "samples" / "shakespeare.jsonl").read_text().splitlines()
    ]
    cfg = OmegaConf.to_container(data_cfg(tmp_path, "shakespeare", tokenizer=tokenizer), resolve=True)
    data = TokenData(prepare(cfg), tokenizer=tokenizer)  # a plain dict, as the trainer passes it
    splits = data.meta["splits"]
    assert len(works) == 9 and (splits["train"]["documents"], splits["val"]["documents"]) == (8, 1)
    assert len(data.split("train")) + len(data.split("val")) == sum(count_tokens(w) + 1 for w in works)


def run_cli(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "data.prepare", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "CI": "true"},
    )


def test_command_line_prepares_local_files(tmp_path):
    """Otherwise the documented `python -m data.prepare data=text ...` command does not work."""
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    result = run_cli(
        tmp_path,
        "data=text",
        f"data.files={tmp_path}/*.txt",
        f"data.dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "data.val_fraction=0.1",
    )
    assert result.returncode == 0, result.stderr
    data = TokenData(tmp_path / "out", tokenizer="gpt2")
    assert data.meta["splits"]["val"]["documents"] == 2
    assert len(data.split("train")) + len(data.split("val")) == sum(
        len(GPT2.encode_ordinary(d)) + 1 for d in DOCS
    )


def test_command_line_reports_user_errors_without_traceback(tmp_path):
    """Otherwise a user's mistake looks like a crash of the program."""
    result = run_cli(
        tmp_path, "data=text", f"data.files={tmp_path}/missing/*.txt", f"data.dir={tmp_path / 'out'}"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "matches no files" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_sources_are_user_errors(tmp_path):
    """Otherwise a wrong data.files or data.text_field fails deep inside `datasets` with a traceback."""
    with pytest.raises(UserError, match="matches no files"):
        prepare(data_cfg(tmp_path, files=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"unsupported file types \['.csv'\]"):
        prepare(data_cfg(tmp_path, files=str(tmp_path / "a.csv")))
    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    with pytest.raises(UserError, match="no field 'body'"):
        prepare(data_cfg(tmp_path, files=str(tmp_path / "corpus.jsonl"), text_field="body"))
    with pytest.raises(UserError, match=re.escape("data.files is not set")):
        prepare(data_cfg(tmp_path))


def test_suggested_prepare_command_works_when_pasted(tmp_path):
    """Wrong if the command an error message suggests drops a setting the user gave (data.files, a text
    field, a split) or breaks on the shell or on Hydra's grammar (a glob, a list, a space in a path): pasted
    into a shell, it must prepare exactly the folder the trainer is waiting for."""
    corpus = tmp_path / "my corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS[:12]):
        (corpus / f"{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS[12:]))
    cfg = data_cfg(tmp_path, files=[f"{corpus}/*.txt", str(tmp_path / "extra.jsonl")], text_field="body",
                   tokenizer="byte", val_fraction=0.25, split_seed=7)
    reason = prep.unprepared_reason(cfg)
    command = reason.split("prepare it with: ", 1)[1]
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, (command, result.stderr)
    assert prep.unprepared_reason(cfg) is None, command
    assert TokenData(cfg.dir).meta["splits"]["val"]["documents"] == 5  # ceil(0.25 × 20)


def test_too_small_validation_split_warns_and_its_suggested_fraction_fixes_it(tmp_path):
    """Wrong if 50 files with the default val_fraction (one held-out file) pass silently, or if the
    data.val_fraction the warning suggests does not give a split the warning accepts; the shipped quick-start
    data (one 173,943-token work of nine) must not warn."""
    from data.split_size import validation_warning

    for i in range(50):
        (tmp_path / f"{i}.txt").write_text(f"file {i} " + "some words of text " * 150, encoding="utf-8")
    small = prepare(data_cfg(tmp_path, files=f"{tmp_path}/*.txt", tokenizer="byte"))
    warning = validation_warning(TokenData(small).meta)
    assert warning is not None and "is 1 of 50 documents" in warning, warning
    fraction = float(re.search(r"data\.val_fraction=([\d.]+) into a new data\.dir", warning)[1])
    cfg = data_cfg(tmp_path, files=f"{tmp_path}/*.txt", tokenizer="byte", val_fraction=fraction)
    cfg.dir = str(tmp_path / "fixed")
    fixed = TokenData(prepare(cfg)).meta
    assert fixed["splits"]["val"]["documents"] >= 5 and fixed["splits"]["val"]["tokens"] >= 10_000
    assert validation_warning(fixed) is None
    sample = data_cfg(tmp_path, name="shakespeare", tokenizer="byte")
    sample.dir = str(tmp_path / "sample")
    assert validation_warning(TokenData(prepare(sample)).meta) is None


def reference_token_files(cfg, encode, eot_id):
    """The token files as the straightforward definition gives them: the documents of each split (the
    split itself is not under test here), each encoded on its own, followed by EOT, concatenated in order."""
    documents = prep._load_documents(cfg)
    splits = prep.sources.split_indices(len(documents), cfg["val_fraction"], cfg["split_seed"])
    return {name: np.array([t for doc in documents.texts(indices) for t in [*encode(doc), eot_id]],
                           dtype="<u2").tobytes() for name, indices in splits.items()}


@pytest.mark.parametrize("tokenizer", ["gpt2", "byte"])
@pytest.mark.parametrize("source", ["sample", "files"])
def test_token_files_are_byte_identical_to_the_per_document_reference(tmp_path, monkeypatch, source,
                                                                      tokenizer):
    """Otherwise the batched, threaded writer reorders, drops or merges documents, or loses an EOT: runs
    would train on other bytes than before (the old pipeline's files matched this reference too). The
    multi-file corpus mixes .txt and .jsonl, spans several read batches and encoder calls (documents longer
    than one call's budget included) and holds non-ASCII text and a literal <|endoftext|>."""
    monkeypatch.setattr(prep, "WRITE_BATCH_DOCS", 7)
    monkeypatch.setattr(token_writer, "CHUNK_CHARS", 300)  # several encoder calls per read batch
    if source == "sample":
        cfg = data_cfg(tmp_path, "shakespeare", tokenizer=tokenizer)
    else:
        for i, doc in enumerate(DOCS[:8]):
            (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
        write_jsonl(tmp_path / "more.jsonl", DOCS[8:] * 2)
        cfg = data_cfg(tmp_path, files=[str(tmp_path / "*.txt"), str(tmp_path / "more.jsonl")],
                       tokenizer=tokenizer, val_fraction=0.2, num_proc=3)
    cfg = OmegaConf.to_container(cfg, resolve=True)
    encode, eot_id = ((GPT2.encode_ordinary, GPT2.eot_token) if tokenizer == "gpt2"
                      else (lambda text: list(text.encode()), 0))
    out = prepare(cfg)
    for name, expected in reference_token_files(cfg, encode, eot_id).items():
        assert (out / f"{name}.bin").read_bytes() == expected, name


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    """Otherwise a preparation onto a nearly full disk writes until the kernel kills it (SIGBUS on the
    memmap), leaving a partial file: the free space must be checked against the exact size first."""
    import data.allocate as allocate

    write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    cfg = data_cfg(tmp_path, files=str(tmp_path / "corpus.jsonl"), tokenizer="byte", val_fraction=0.2)
    real = allocate.shutil.disk_usage
    monkeypatch.setattr(allocate.shutil, "disk_usage", lambda path: real(path)._replace(free=10 << 20))
    with pytest.raises(UserError, match=r"has 0\.01 GiB free but train\.bin\.tmp needs 0\.00 GiB"):
        prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_failed_allocation_leaves_no_partial_file(tmp_path):
    """Otherwise a file-size limit or a full disk found by posix_fallocate leaves the temporary file."""
    from data.allocate import reserve

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    script = ("from pathlib import Path; from data.allocate import reserve; "
              f"reserve(Path({str(tmp_path)!r}) / 'x.tmp', 8 << 20)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=apply,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert "UserError: cannot allocate 0.01 GiB" in result.stderr and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []
    reserve(tmp_path / "ok.tmp", 3 << 20)
    stat = (tmp_path / "ok.tmp").stat()
    assert stat.st_size == 3 << 20 and stat.st_blocks * 512 >= 3 << 20, "the blocks were not allocated"


def test_files_resolve_to_the_paths_and_order_of_path_resolve(tmp_path, monkeypatch):
    """Wrong if the fast resolution of data.files gives other paths or another order than the definition
    (`sorted(Path(p).resolve())`): the order decides which documents are validation, and the paths enter the
    fingerprint of folders prepared before, which would then be refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "real").mkdir()
    for name in ("a-b.txt", "a/b.txt", "a/c.txt", "real/d.txt", "a.txt", "a0.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "a" / "e.txt").symlink_to(tmp_path / "real" / "d.txt")
    monkeypatch.chdir(tmp_path)
    patterns = ["**/*.txt", str(tmp_path / "link" / "*.txt"), "a/../real/*.txt", "./a//*.txt"]
    expected = sorted({Path(p).resolve() for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    assert prep._resolve_files(patterns) == [p for p in expected if p.is_file()]
