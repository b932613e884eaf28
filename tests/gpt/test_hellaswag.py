"""HellaSwag scoring: the batched scorer against a one-sequence-at-a-time reference, a memorised ending found,
the periodic evaluation in metrics.jsonl, and bad input as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from data.tokenizers import get_tokenizer
from gpt.eval.hellaswag import encode_items, evaluate_hellaswag, predictions, read_items
from gpt.eval.scoring import score_continuations
from gpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]
# Items in HellaSwag's own jsonl format (fields as in hellaswag_val.jsonl), texts written for this test.
ITEMS = [
    {"ind": 1, "activity_label": "Baking cookies", "ctx_a": "A woman puts a tray of dough in the oven.",
     "ctx_b": "she", "ctx": "A woman puts a tray of dough in the oven. she",
     "endings": ["sets a timer and waits by the window.", "throws the tray across the garden at a dog.",
                 "paints the oven door a bright shade of blue.", "sings."],
     "source_id": "test", "split": "val", "split_type": "indomain", "label": 0},
    {"ind": 2, "activity_label": "Rowing", "ctx_a": "Two men push a boat into the river.", "ctx_b": "they",
     "ctx": "Two men push a boat into the river. they",
     "endings": ["climb in and start to row downstream together while the sun rises.", "eat the oars.",
                 "fly.", "read a newspaper under the water for several hours."],
     "source_id": "test", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 3, "activity_label": "Tennis", "ctx_a": "A girl bounces a ball on a court.", "ctx_b": "she",
     "ctx": "A girl bounces a ball on a court. she",
     "endings": ["serves it over the net.", "turns into a tree.", "swallows the racket whole and smiles.",
                 "phones the moon."],
     "source_id": "test", "split": "val", "split_type": "zeroshot", "label": 0},
]


def random_model(block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=50304, bias=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def reference_scores(model: GPT, context: list[int], ending: list[int]) -> tuple[float, float]:
    """Brute force: one unpadded sequence per forward, the ending's log-probabilities summed by hand."""
    tokens = torch.tensor([context + ending])
    with torch.no_grad():
        logprobs = F.log_softmax(model(tokens[:, :-1])[0][0].double(), dim=-1)
    total = sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(ending))
    return total, total / len(ending)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batched_scorer_equals_one_sequence_at_a_time(batch_size):
    """Wrong if batching (padding, sorting by length, slicing the ending's positions) changes any score or
    choice, or acc and acc_norm are computed from the wrong statistic."""
    model = random_model()
    items = encode_items(ITEMS, get_tokenizer("gpt2"))
    requests = [(item.context, ending) for item in items for ending in item.endings]
    scores = score_continuations(model, requests, batch_size=batch_size)
    expected_choices = []
    for k, item in enumerate(items):
        reference = [reference_scores(model, item.context, ending) for ending in item.endings]
        for j, (total, _) in enumerate(reference):
            assert scores[4 * k + j].logprob == pytest.approx(total, abs=1e-4)
            assert scores[4 * k + j].n_tokens == len(item.endings[j])
        expected_choices.append((max(range(4), key=lambda j: reference[j][0]),
                                 max(range(4), key=lambda j: reference[j][1])))
    assert predictions(model, items, batch_size=batch_size) == expected_choices
    assert any(s != n for s, n in expected_choices)  # the two statistics do disagree somewhere here


def test_ranks_split_the_items_and_agree_with_one_process():
    """Wrong if the per-rank split drops, double-counts or mis-weights an item (3 items over 2 ranks)."""
    model = random_model()
    items = encode_items(ITEMS, get_tokenizer("gpt2"))
    whole = evaluate_hellaswag(model, items)
    parts = [evaluate_hellaswag(model, items, rank=r, world_size=2) for r in range(2)]
    assert whole["n"] == 3
    for key in ("acc", "acc_norm"):
        assert sum(part[key] for part in parts) == pytest.approx(whole[key])


def memorising_model(texts: list[str]) -> GPT:
    """A byte-level GPT trained until it has learnt `texts` by heart."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=256))
    rows = [list(text.encode()) for text in texts]
    width = max(map(len, rows))
    data = torch.tensor([row + [-1] * (width - len(row)) for row in rows])
    x, y = data[:, :-1].clamp(min=0), data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
    return model.eval()


def test_a_memorised_ending_is_chosen():
    """Wrong if the scorer ranks endings by anything but their likelihood given the context: a model that
    learnt the true continuations by heart must choose them over random ones of the same length, wherever
    the true one is placed."""
    pairs = [("The kettle sings;", "Anna pours tea"), ("A dog runs and", "catches a ball"),
             ("He climbs up to", "fix the roof")]
    model = memorising_model([f"{ctx} {ending}." for ctx, ending in pairs])
    generator = torch.Generator().manual_seed(3)
    rows = []
    for k, (ctx, ending) in enumerate(pairs):
        letters = "abcdefghijklmnopqrstuvwxyz "
        randoms = ["".join(letters[i] for i in torch.randint(0, 27, (len(ending),), generator=generator))
                   for _ in range(3)]
        label = k % 4
        rows.append({"ctx": ctx, "endings": [*randoms[:label], ending, *randoms[label:]], "label": label})
    result = evaluate_hellaswag(model, encode_items(rows, get_tokenizer("byte")))
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 3}


def write_items(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bad_items_are_one_line(tmp_path):
    """Wrong if a malformed item or a missing file ends in a KeyError/traceback instead of a UserError."""
    with pytest.raises(UserError, match="does not exist"):
        read_items(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="item 1 is not in HellaSwag's format"):
        bad = write_items(tmp_path / "bad.jsonl", [{"ctx": "x", "endings": ["a"], "label": 0}])
        encode_items(read_items(str(bad)), get_tokenizer("byte"))
    assert len(read_items(str(write_items(tmp_path / "ok.jsonl", ITEMS)), limit=2)) == 2


def test_script_scores_a_run_and_reports_offline_hub_in_one_line(tmp_path, capsys):
    """Wrong if the command-line tool does not write the contracted JSON keys, or an unreachable hub
    dataset ends in a traceback rather than one line naming --data."""
    from tests.tiny_model import random_model as random_byte_model
    from tests.tiny_model import write_checkpoint

    run = tmp_path / "run"
    write_checkpoint(random_byte_model(), run, "byte")
    data = write_items(tmp_path / "items.jsonl", ITEMS)
    script = str(REPO / "scripts" / "eval_hellaswag.py")
    from gpt.cli.eval_hellaswag import main

    main([str(run), "--data", str(data), "--json", str(tmp_path / "out.json")])
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["n"] == 3 and 0 <= record["acc"] <= 1 and 0 <= record["acc_norm"] <= 1
    assert "HellaSwag (3 items" in capsys.readouterr().out
    offline = subprocess.run([sys.executable, script, str(run), "--limit", "2"], capture_output=True,
                             text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1 and "--data" in offline.stderr


def test_periodic_hellaswag_is_written_to_metrics_and_plotted(tmp_path):
    """Wrong if `train.hellaswag_interval` does not put `hellaswag_acc_norm` into metrics.jsonl at step 0,
    at its interval and at the end, or plot_curves.py cannot draw it."""
    pytest.importorskip("matplotlib")
    from gpt.trainer import train
    from tests.hydra_compose import compose_train, tiny_run

    data = write_items(tmp_path / "items.jsonl", ITEMS)
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, tmp_path / "data", "train.hellaswag_interval=4",
                                 f"train.hellaswag_data={data}", steps=6, interval=2)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "hellaswag_acc_norm" in r] == [0, 4, 6]
    assert all(0 <= r["hellaswag_acc"] <= 1 for r in records if "hellaswag_acc" in r)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_curves.py"), str(out), "--metric",
                             "hellaswag_acc_norm", "--out", str(tmp_path / "h.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "h.png").stat().st_size > 0


def test_an_interval_off_the_evaluation_steps_is_refused():
    """Wrong if a HellaSwag interval that is no multiple of the evaluation interval is accepted: its scores
    would be computed but never written (records are written at evaluation steps)."""
    from gpt.config import parse_config
    from tests.hydra_compose import compose_train

    with pytest.raises(UserError, match=r"hellaswag_interval=3 must be 0 .* of train\.eval_interval=2"):
        parse_config(compose_train(["train.hellaswag_interval=3", "train.eval_interval=2"]))
    assert parse_config(compose_train(["train.hellaswag_interval=4", "train.eval_interval=2"]))
