"""Evaluating a trained run: eval_loss.py against the trainer's own validation loss, sample.py's output and
seed, and lm-evaluation-harness against this project's scorer, all offline on a quick-start-sized run."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.errors import UserError
from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_run

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The quick start shrunk (byte tokenizer, float32), trained 8 steps."""
    root = tmp_path_factory.mktemp("evaluation")
    train(compose_train(tiny_run(root / "run", root / "data", steps=8)))
    return root / "run"


sys.path.insert(0, str(SCRIPTS))


def script(name: str, *args: object) -> None:
    """Run a script's main in this process (no interpreter start-up per call)."""
    importlib.import_module(name).main([str(arg) for arg in args])


def last_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def test_eval_loss_equals_the_trainers_validation_loss(run, tmp_path):
    """Wrong if eval_loss.py reads other sequences than the trainer's validation set, averages differently,
    or loads the weights (from the run, or from its Hugging Face export) wrongly."""
    script("eval_loss", run, "--json", tmp_path / "loss.json")
    record = json.loads((tmp_path / "loss.json").read_text())
    assert record["loss"] == pytest.approx(last_val_loss(run), rel=1e-6)
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)
    pytest.importorskip("transformers")
    script("export_hf", run, "--out", tmp_path / "hf")
    manifest = json.loads((run / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    script("eval_loss", tmp_path / "hf", "--data-dir", manifest["config"]["data"]["dir"], "--sequences", "8",
           "--batch-size", "4", "--json", tmp_path / "hf.json")
    assert json.loads((tmp_path / "hf.json").read_text())["loss"] == pytest.approx(record["loss"], rel=1e-6)
    with pytest.raises(UserError, match="pass --data-dir"):
        script("eval_loss", tmp_path / "hf")


def test_sample_prints_text_and_repeats_with_a_seed(run, capsys):
    """Wrong if sampling prints nothing, ignores the prompt, or is not reproducible from its seed."""
    args = (run, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "1.0", "--top-k", "50")
    outputs = []
    for seed in ("1", "1", "2"):
        script("sample", *args, "--seed", seed)
        outputs.append(capsys.readouterr().out)
    first, again, other = outputs
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:") + 10
    assert first == again
    assert first != other


ITEMS = [
    {"ctx": "ROMEO: What light through yonder window",
     "endings": ["breaks?", "sings the moon", "zzz qq", "and the dog ate it"], "label": 0},
    {"ctx": "First Citizen: Before we proceed any further,",
     "endings": ["hear me speak.", "xq xq xq", "the end", "all is well"], "label": 0},
    {"ctx": "KING: Now is the winter of our", "endings": ["discontent", "bread", "qq", "of"], "label": 1},
    {"ctx": "To be, or not to be, that is", "endings": ["the cat", "the question", "no", "mm"], "label": 1},
    {"ctx": "HAMLET: Alas, poor", "endings": ["Yorick!", "Horatio", "tree", "bbbbbbbb"], "label": 2},
]
TASK_YAML = """task: local_completion
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_offline_and_agrees_with_our_scorer(run, tmp_path):
    """Wrong if the registered model class does not load a run, the harness's log-likelihoods (and so its
    accuracy) differ from this project's own scorer on the same items, or a perplexity task's document
    log-likelihood differs from the sum over its tokens."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from data.tokenizers import get_tokenizer
    from gpt.eval.hellaswag import encode_items, evaluate_hellaswag
    from gpt.eval.lm_eval_model import SophiaGPT
    from gpt.eval.pretrained import load_pretrained
    from gpt.eval.scoring import score_continuations

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK_YAML.format(data=data))
    lm = SophiaGPT(pretrained=str(run), device="cpu", batch_size=3)
    results = simple_evaluate(model=lm, tasks=["local_completion"], log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                       include_defaults=False))
    harness_acc = results["results"]["local_completion"]["acc,none"]
    harness_lls = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in results["samples"]["local_completion"]}

    model = load_pretrained(run).model
    items = encode_items(ITEMS, get_tokenizer("byte"))
    ours = score_continuations(model, [(item.context, e) for item in items for e in item.endings])
    for k in range(len(ITEMS)):
        assert harness_lls[k] == pytest.approx([s.logprob for s in ours[4 * k : 4 * k + 4]], abs=1e-4)
    assert harness_acc == evaluate_hellaswag(model, items)["acc"]

    text = "ROMEO: But soft!"  # perplexity tasks: a document's log-likelihood after the EOT token
    tokens = torch.tensor([[0, *text.encode()]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1])[0][0].double(), dim=-1)
    expected = sum(logprobs[i, t].item() for i, t in enumerate(tokens[0, 1:].tolist()))
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))]) == pytest.approx([expected], abs=1e-4)


def test_lm_eval_script_names_the_extra_when_missing(tmp_path):
    """Wrong if running the harness without the optional package ends in a traceback instead of one line
    naming the extra to install."""
    blocker = tmp_path / "lm_eval.py"
    blocker.write_text("raise ImportError('blocked for this test', name='lm_eval')\n")
    env_path = f"{tmp_path}:{REPO}"
    result = subprocess.run([sys.executable, str(SCRIPTS / "run_lm_eval.py"), "--help"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": env_path})
    assert result.returncode == 2 and "pip install -e '.[lm_eval]'" in result.stderr
    assert result.stderr.count("\n") == 1
