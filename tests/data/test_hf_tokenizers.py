"""Hugging Face tokenizers (through the `tokenizers` library): loaded from local files here (the hub in the
product), uint32 token files beyond 65,536 ids, and the tokenizer's identity recorded and checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.errors import UserError
from data.loader import TokenData
from data.prepare import prepare, unprepared_reason
from data.tokenizers import get_tokenizer
from tests.hydra_compose import run_train_py, tiny_run

REPO = Path(__file__).resolve().parents[2]
WORKS = [json.loads(line)["text"]
         for line in (REPO / "data/samples/shakespeare.jsonl").read_text().splitlines()]
TEXTS = ["hello world", "Grüße, 東京! naïve café — ☃\n\ttabs", "emoji 🤖 and <|endoftext|> as text", ""]


def small_bpe(folder: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE trained on the shipped Shakespeare sample, saved as folder/tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(WORKS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def wide_word_level(folder: Path) -> Path:
    """A word-level tokenizer whose ids exceed 65,535: the Shakespeare words get ids 60,000 onwards, so the
    corpus's tokens are mostly above what uint16 holds; "<|endoftext|>" is 0 and "[UNK]" 1."""
    words = sorted({w for work in WORKS for w in pre_tokenizers.Whitespace().pre_tokenize_str(work)
                    for w in [w[0]]})
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: 60_000 + i for i, w in enumerate(words)}}
    assert max(vocab.values()) >= 65_536, "the corpus has too few words for the test"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def text_config(tmp_path, files, tokenizer, **overrides):
    return {"name": "text", "source": "files", "files": files, "text_field": "text",
            "tokenizer": str(tokenizer), "val_fraction": 0.2, "split_seed": 3, "num_proc": 2,
            "dir": str(tmp_path / "out"), **overrides}


def corpus(folder: Path, count: int = 12) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:02d}.txt").write_text(WORKS[i % len(WORKS)][i * 997 : i * 997 + 20_000] + TEXTS[i % 4],
                                             encoding="utf-8")
    return str(folder / "*.txt")


def test_local_tokenizer_json_encodes_as_the_library_and_round_trips(tmp_path):
    """Wrong if the wrapper adds special tokens, truncates, treats a literal <|endoftext|> in a document as
    the separator, picks another EOT, or loses text; the reference is the tokenizers library called
    directly."""
    path = small_bpe(tmp_path / "bpe")
    reference = Tokenizer.from_file(str(path))
    tokenizer = get_tokenizer(str(path))
    assert tokenizer.vocab_size == reference.get_vocab_size() == 600
    assert tokenizer.eot_id == reference.token_to_id("<|endoftext|>")
    for text in [*TEXTS, WORKS[0][:5000]]:
        ids = tokenizer.encode(text)
        if "<|endoftext|>" not in text:
            assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.eot_id not in ids
        assert tokenizer.decode(ids) == text
    arrays = tokenizer.encode_arrays(TEXTS)
    assert [a.tolist() for a in arrays] == [tokenizer.encode(t) for t in TEXTS]
    assert get_tokenizer(str(path.parent)).files_sha256 == tokenizer.files_sha256  # the folder names it too


def test_eot_comes_from_tokenizer_config_and_a_tokenizer_without_one_is_refused(tmp_path):
    """Wrong if a tokenizer_config.json's eos_token is ignored, or a tokenizer with no end-of-text token is
    used with a guessed separator."""
    folder = tmp_path / "bpe"
    small_bpe(folder)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "e"}}))
    assert get_tokenizer(str(folder)).eot_id == reference.token_to_id("e")
    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    (tmp_path / "bare").mkdir()
    bare.save(str(tmp_path / "bare" / "tokenizer.json"))
    with pytest.raises(UserError, match=r"has no end-of-text token \(none of <\|endoftext\|>"):
        get_tokenizer(str(tmp_path / "bare"))


def test_unknown_names_and_unreachable_hub_tokenizers_are_one_clear_error(tmp_path):
    """Wrong if a typo tries the network, or an unreachable hub tokenizer gives a traceback, not the fix."""
    with pytest.raises(UserError, match="unknown tokenizer 'gtp2'; choose gpt2, byte, a Hugging Face"):
        get_tokenizer("gtp2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"),
           "PYTHONPATH": str(REPO)}
    script = "from data.tokenizers import get_tokenizer; get_tokenizer('EleutherAI/gpt-neox-20b')"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert "UserError: cannot load the tokenizer 'EleutherAI/gpt-neox-20b' from the Hugging Face Hub" in \
        result.stderr and "HF_HUB_OFFLINE" in result.stderr, result.stderr[-2000:]


def test_hub_name_loads_from_the_hugging_face_cache(tmp_path):
    """Wrong if an owner/name[@revision] is not fetched through the hub client (here offline, from a cache
    laid out as huggingface_hub writes it), or its tokenizer_config.json is not read."""
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("a" * 40)
    small_bpe(snapshot)
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(REPO)}
    script = ("from data.tokenizers import get_tokenizer; t = get_tokenizer('someone/tiny@main'); "
              "print(t.vocab_size, t.eot_id, t.encode('hello'))")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    reference = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    assert result.stdout.split(" ", 2) == ["600", str(reference.token_to_id("<|endoftext|>")),
                                           f"{reference.encode('hello').ids}\n"], result.stderr[-2000:]


def decode_documents(tokens: np.ndarray, eot_id: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_vocabulary_beyond_65536_ids_writes_uint32_files_with_every_id_intact(tmp_path):
    """Wrong if ids above 65,535 wrap around in uint16 files, meta.json claims the wrong dtype, the loader
    reads the files with the wrong width, or a document's ids differ from the tokenizer's own encoding."""
    path = wide_word_level(tmp_path / "wide")
    reference = Tokenizer.from_file(str(path))
    reference.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text
    out = prepare(text_config(tmp_path, corpus(tmp_path / "corpus"), path))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65_536 and meta["eot_id"] == 0
    tokens = {name: np.fromfile(out / f"{name}.bin", dtype="<u4") for name in ("train", "val")}
    assert max(int(t.max()) for t in tokens.values()) >= 65_536
    documents = [d for t in tokens.values() for d in decode_documents(t, 0)]
    texts = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "corpus").iterdir())]
    assert sorted(documents) == sorted(reference.encode(t, add_special_tokens=False).ids for t in texts)
    data = TokenData(out, tokenizer=str(path))
    assert data.split("train").dtype == np.dtype("<u4") and np.array_equal(data.split("val"), tokens["val"])


def test_a_corpus_of_a_wide_tokenizer_trains(tmp_path, capsys, monkeypatch):
    """Wrong if a corpus prepared with a >65,535-id tokenizer cannot be trained on (the loader, the vocabulary
    check or the model): a tiny train.py run with model.vocab_size set to the tokenizer's must finish with
    finite losses."""
    monkeypatch.chdir(tmp_path)
    path = wide_word_level(tmp_path / "wide")
    vocab_size = get_tokenizer(str(path)).vocab_size
    files = corpus(tmp_path / "corpus", 20)
    overrides = ["data.source=files", "data.name=text", f"data.files={files}", f"data.tokenizer={path}",
                 "data.val_fraction=0.2", "data.auto_prepare=true", f"model.vocab_size={vocab_size}",
                 "model.n_embd=32", "model.block_size=16", "train.eval_sequences=4"]
    capsys.readouterr()
    code = run_train_py(tiny_run(tmp_path / "run", tmp_path / "data", *overrides, steps=4, interval=2))
    assert code == 0, capsys.readouterr().err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses)) and abs(losses[0] - np.log(vocab_size)) < 1.5
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["dtype"] == "uint32"


def test_data_of_another_tokenizer_or_another_version_of_it_is_refused_in_one_line(tmp_path, capsys,
                                                                                     monkeypatch):
    """Wrong if a folder prepared with one tokenizer trains with another (a different name, or the same
    tokenizer.json path whose content changed): the ids would mean other text. Refused in one line."""
    monkeypatch.chdir(tmp_path)
    first = small_bpe(tmp_path / "bpe")
    files = corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path, files, first)
    prepare(cfg)
    assert unprepared_reason(cfg) is None
    other = small_bpe(tmp_path / "other", vocab_size=700)
    with pytest.raises(UserError, match=f"prepared with tokenizer '{first}' but '{other}' is expected"):
        TokenData(cfg["dir"], tokenizer=str(other))
    get_tokenizer.cache_clear()
    small_bpe(tmp_path / "bpe", vocab_size=650)  # the same path, another tokenizer
    assert "tokenizer_sha256" in unprepared_reason(cfg)
    capsys.readouterr()
    code = run_train_py(tiny_run(tmp_path / "run", cfg["dir"], "data.source=files", "data.name=text",
                                 f"data.files={files}", f"data.tokenizer={first}", "data.val_fraction=0.2",
                                 "data.split_seed=3", "model.vocab_size=700"))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "holds data prepared with other settings (tokenizer_sha256: " in lines[0], err


def test_token_dtype_boundary():
    """Wrong if a vocabulary whose largest id is 65,535 gets uint32 files (twice the disk for nothing), or one
    with id 65,536 gets uint16 files (that id would wrap to 0, the EOT of some tokenizers)."""
    from data.prepare import token_dtype

    assert (token_dtype(256), token_dtype(65_536), token_dtype(65_537)) == ("uint16", "uint16", "uint32")
    assert np.iinfo(np.uint16).max == 65_535
