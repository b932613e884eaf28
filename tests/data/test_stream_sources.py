"""Stream sources (`data=pile`, `data=fineweb_edu`): Hub datasets read with `streaming=True`, here from local
folders laid out as a Hub dataset (offline); validation from a split of its own or the stream's first tokens,
an optional token budget for training, exact counts in meta.json."""

import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from omegaconf import OmegaConf

import data.prepare as prep
import data.token_writer as token_writer
from common.errors import UserError
from data.loader import TokenData
from data.prepare import prepare, unprepared_reason
from tests.hydra_compose import compose_train

REPO = Path(__file__).resolve().parents[2]
GPT2 = tiktoken.get_encoding("r50k_base")
WORKS = [json.loads(line)["text"]
         for line in (REPO / "data/samples/shakespeare.jsonl").read_text().splitlines()]


def documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [WORKS[i % 9][int(s) : int(s) + int(n)] for i, (s, n) in
            enumerate(zip(rng.integers(0, 50_000, count), rng.integers(50, 3_000, count), strict=True))]


def hub_folder(root: Path, splits: dict[str, list[str]], field: str = "text") -> Path:
    """A local dataset folder the way `datasets` reads a Hub repository: one JSON-lines file per split."""
    root.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps({field: d, "meta": i}) + "\n"
                                                     for i, d in enumerate(docs)))
    return root


def config(name: str, tmp_path: Path, hf_path: Path, **overrides) -> dict:
    cfg = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, {"hf_path": str(hf_path), "hf_name": None, "tokenizer": "gpt2", "num_proc": 2,
                                "dir": str(tmp_path / "out")}, overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def token_file(docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in [*GPT2.encode_ordinary(d), GPT2.eot_token]], dtype="<u2")


def first_documents_reaching(docs: list[str], budget: int) -> int:
    """How many leading documents it takes for their tokens (each + EOT) to reach `budget`."""
    total = 0
    for count, doc in enumerate(docs, 1):
        total += len(GPT2.encode_ordinary(doc)) + 1
        if total >= budget:
            return count
    return len(docs)


@pytest.fixture
def small_batches(monkeypatch):
    """Read 3 documents at a time and encode ~2,000 characters per task, so budgets fall inside batches."""
    monkeypatch.setattr(prep, "WRITE_BATCH_DOCS", 3)
    monkeypatch.setattr(token_writer, "CHUNK_CHARS", 2_000)


def test_pile_layout_takes_val_from_its_own_split_and_train_up_to_the_budget(tmp_path, small_batches):
    """Wrong if val.bin is not the validation split's documents in order, train.bin not the train split's
    (cut at whole documents once train_tokens is reached), or meta.json's counts are not exact."""
    train, val = documents(40, 0), documents(6, 1)
    folder = hub_folder(tmp_path / "pile", {"train": train, "validation": val})
    out = prepare(config("pile", tmp_path, folder))
    assert (out / "val.bin").read_bytes() == token_file(val).tobytes()
    assert (out / "train.bin").read_bytes() == token_file(train).tobytes()

    budget = len(token_file(train)) // 3
    kept = first_documents_reaching(train, budget)
    cfg = config("pile", tmp_path / "capped", folder, train_tokens=budget)
    (tmp_path / "capped").mkdir()
    meta = TokenData(prepare(cfg)).meta
    assert (Path(cfg["dir"]) / "train.bin").read_bytes() == token_file(train[:kept]).tobytes()
    assert meta["splits"]["train"] == {"tokens": len(token_file(train[:kept])), "documents": kept}
    assert meta["splits"]["val"] == {"tokens": len(token_file(val)), "documents": len(val)}
    assert meta["source"]["kind"] == "stream" and meta["source"]["train_tokens"] == budget


def test_fineweb_layout_holds_out_the_first_val_tokens_of_the_stream(tmp_path, small_batches):
    """Wrong if the validation split is not the stream's first documents up to (and including the one
    crossing) val_tokens, or if the training split does not continue exactly after them."""
    docs = documents(50, 2)
    folder = hub_folder(tmp_path / "fineweb", {"train": docs})
    budget = len(token_file(docs)) // 5
    held_out = first_documents_reaching(docs, budget)
    out = prepare(config("fineweb_edu", tmp_path, folder, val_tokens=budget))
    assert (out / "val.bin").read_bytes() == token_file(docs[:held_out]).tobytes()
    assert (out / "train.bin").read_bytes() == token_file(docs[held_out:]).tobytes()
    assert prepare(config("fineweb_edu", tmp_path, folder, val_tokens=budget)) == out  # a rerun does nothing
    assert unprepared_reason(config("fineweb_edu", tmp_path, folder, val_tokens=budget)) is None


def test_stream_mistakes_are_user_errors(tmp_path):
    """Wrong if a stream config that cannot work (no validation split, a split-by-fraction setting, a text
    field the records lack, a budget that leaves train empty) fails with a traceback or writes files."""
    docs = documents(10, 3)
    folder = hub_folder(tmp_path / "data", {"train": docs})
    with pytest.raises(UserError, match="needs a validation split"):
        prepare(config("fineweb_edu", tmp_path, folder, val_tokens=None))
    with pytest.raises(UserError, match=r"data\.val_fraction does not apply to a stream source"):
        prepare(config("fineweb_edu", tmp_path, folder, val_fraction=0.1))
    with pytest.raises(UserError, match=r"\(default config, train split\) has no field 'body'"):
        prepare(config("fineweb_edu", tmp_path, folder, text_field="body"))
    with pytest.raises(UserError, match=r"the train split of .* came out empty"):
        prepare(config("fineweb_edu", tmp_path, folder, val_tokens=10**9))
    with pytest.raises(UserError, match=r"cannot stream .*nowhere"):
        prepare(config("fineweb_edu", tmp_path, tmp_path / "nowhere"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("name", "hf_path", "tokenizer"), [
    ("pile", "monology/pile-uncopyrighted", "EleutherAI/gpt-neox-20b"),
    ("fineweb_edu", "HuggingFaceFW/fineweb-edu", "gpt2"),
])
def test_shipped_stream_configs_compose_and_suggest_their_command(name, hf_path, tokenizer, tmp_path):
    """Wrong if `data=pile` or `data=fineweb_edu` is refused by the trainer's config checks, or if the
    command its error suggests would not prepare that data."""
    cfg = compose_train([f"data={name}", f"data.dir={tmp_path / 'd'}"]).data
    assert (cfg.hf_path, cfg.tokenizer, cfg.source) == (hf_path, tokenizer, "stream")
    reason = unprepared_reason(cfg)
    assert f"prepare it with: python -m data.prepare data={name} " in reason, reason
    assert f"data.dir={tmp_path / 'd'}" in reason, reason
