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


LOCAL_TASKS = REPO / "docs" / "examples" / "lm_eval"
LOCAL_TASK = "shakespeare_completion"


def script(name: str, *args: object) -> None:
    """Run a command's main in this process (no interpreter start-up per call)."""
    importlib.import_module(f"gpt.cli.{name}").main([str(arg) for arg in args])


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
    card = (tmp_path / "hf" / "README.md").read_text()  # the model card states what was measured above
    loss = last_val_loss(run)
    assert f"{loss:.4f} nats/token (perplexity {math.exp(loss):.2f}) at step 8" in card
    tokens = 8 * manifest["config"]["train"]["global_batch_size"] * manifest["config"]["model"]["block_size"]
    assert f"= {tokens:,} tokens" in card and f"`{manifest['config']['optim']['name']}`" in card


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


def test_sample_streams_stops_and_reads_prompt_files(run, tmp_path, capsys):
    """Wrong if streaming prints other text than a whole sample, a prompt file is read otherwise than the
    same text given inline (nanoGPT's FILE: or --prompt-file), or a sample goes past a stop string."""
    prompt = "KING:\nWhat say"
    (tmp_path / "prompt.txt").write_text(prompt)
    args = ("--max-new-tokens", "60", "--temperature", "0.9", "--top-p", "0.95", "--seed", "3")
    outputs = []
    for source in (("--prompt", prompt), ("--prompt", f"FILE:{tmp_path / 'prompt.txt'}"),
                   ("--prompt-file", tmp_path / "prompt.txt"), ("--prompt", prompt, "--no-stream")):
        script("sample", run, *source, *args)
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith(prompt) and len(outputs[0]) > len(prompt) + 20
    assert outputs.count(outputs[0]) == 4
    sample = outputs[0][len(prompt) :]
    stop = next(ch for ch in sample if ch.isalpha())  # a character the unstopped sample does write
    script("sample", run, "--prompt", prompt, *args, "--stop", stop)
    stopped = capsys.readouterr().out
    assert stopped == prompt + sample[: sample.index(stop)] + "\n"


def test_sample_help_shows_the_defaults(capsys):
    """Wrong if --help hides a default, or shows one that is not configs/sample.yaml's."""
    from gpt.sampling import sampling_defaults

    with pytest.raises(SystemExit):
        script("sample", "--help")
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]  # past the usage line, which names every option too
    for option in ("max-new-tokens", "temperature", "top-k", "top-p", "seed"):
        value = sampling_defaults()[option.replace("-", "_")]
        assert f"(default: {value})" in text.split(f"--{option}")[1].split("--")[0], option


def test_bad_sampling_input_is_one_line(run, tmp_path):
    with pytest.raises(UserError, match="--top-p must be in"):
        script("sample", run, "--top-p", "0")
    with pytest.raises(UserError, match="cannot read the prompt file"):
        script("sample", run, "--prompt", f"FILE:{tmp_path / 'missing.txt'}")


def local_items() -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS / f"{LOCAL_TASK}.jsonl").read_text().splitlines()]


def harness_loglikelihoods(model, monkeypatch, **kwargs) -> tuple[dict, dict[int, list[float]]]:
    """The shipped local task through lm-evaluation-harness (from the repository's root, where its data path
    points): the results and each item's four log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)
    results = simple_evaluate(model=model, tasks=[LOCAL_TASK], log_samples=True, **kwargs,
                              task_manager=TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False))
    samples = results["samples"][LOCAL_TASK]
    return results["results"][LOCAL_TASK], {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in samples}


def test_lm_eval_runs_offline_and_agrees_with_our_scorer(run, monkeypatch):
    """Wrong if the registered model class does not load a run, the harness's log-likelihoods (and so its
    accuracy) differ from this project's own scorer on the same items, or a perplexity task's document
    log-likelihood differs from the sum over its tokens."""
    pytest.importorskip("lm_eval")
    from data.tokenizers import get_tokenizer
    from gpt.eval.hellaswag import encode_items, evaluate_hellaswag
    from gpt.eval.lm_eval_model import SophiaGPT
    from gpt.eval.pretrained import load_pretrained
    from gpt.eval.scoring import score_continuations

    lm = SophiaGPT(pretrained=str(run), device="cpu", batch_size=3)
    results, harness_lls = harness_loglikelihoods(lm, monkeypatch)

    model = load_pretrained(run).model
    items = encode_items(local_items(), get_tokenizer("byte"))
    ours = score_continuations(model, [(item.context, e) for item in items for e in item.endings])
    for k in range(len(items)):
        assert harness_lls[k] == pytest.approx([s.logprob for s in ours[4 * k : 4 * k + 4]], abs=1e-4)
    assert results["acc,none"] == evaluate_hellaswag(model, items)["acc"]

    text = "ROMEO: But soft!"  # perplexity tasks: a document's log-likelihood after the EOT token
    tokens = torch.tensor([[0, *text.encode()]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1])[0][0].double(), dim=-1)
    expected = sum(logprobs[i, t].item() for i, t in enumerate(tokens[0, 1:].tolist()))
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))]) == pytest.approx([expected], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_harness_hf_model_runs_a_local_task_on_an_export(run, tmp_path, monkeypatch, tokenizer):
    """lm-evaluation-harness's own `hf` model on exports, byte-level (the quick start's run) and GPT-2's BPE
    (a random model): wrong if it cannot load the export (the byte tokenizer once lacked the EOS token it
    needs) or scores the items otherwise than `sophia-gpt` does with this project's model and tokenizer."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's `hf` model needs it: the lm-eval extra installs lm-eval[hf]
    import lm_eval.models.huggingface  # noqa: F401  (registers `hf`; lm-eval's CLI imports it, simple_evaluate not)

    from data.tokenizers import get_tokenizer
    from gpt.eval.hf import export_hf
    from gpt.eval.lm_eval_model import SophiaGPT
    from tests.tiny_model import random_model

    folder = tmp_path / "hf"
    if tokenizer == "byte":
        script("export_hf", run, "--out", folder)
    else:
        export_hf(random_model(vocab_size=50304), get_tokenizer("gpt2"), folder)
    hf_results, hf_lls = harness_loglikelihoods("hf", monkeypatch, device="cpu", batch_size=4,
                                                model_args=f"pretrained={folder},dtype=float32")
    ours, our_lls = harness_loglikelihoods(SophiaGPT(pretrained=str(folder), device="cpu"), monkeypatch)
    for k, lls in our_lls.items():
        assert hf_lls[k] == pytest.approx(lls, abs=1e-4), k
    assert hf_results["acc,none"] == ours["acc,none"]


HUB_TASK = """task: hub_only
dataset_path: nobody/not_cached_anywhere
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: label
"""


def test_a_hub_task_offline_is_one_line(tmp_path, monkeypatch):
    """Wrong if a task whose data must come from the hub, asked for offline, ends in the harness's long
    traceback instead of one line naming the dataset and the two ways out."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from gpt.eval.lm_eval_model import SophiaGPT, offline_is_one_line

    (tmp_path / "hub_task.yaml").write_text(HUB_TASK)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error, offline_is_one_line():
        simple_evaluate(model=SophiaGPT(pretrained=str(write_tiny_run(tmp_path)), device="cpu"),
                        tasks=["hub_only"],
                        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    message = str(error.value)
    assert "\n" not in message and "'nobody/not_cached_anywhere'" in message
    assert "--include_path docs/examples/lm_eval" in message and "network access" in message


def write_tiny_run(root: Path) -> Path:
    from tests.tiny_model import random_model, write_checkpoint

    write_checkpoint(random_model(), root / "tiny_run", "byte")
    return root / "tiny_run"


def test_lm_eval_script_names_the_extra_when_missing(tmp_path):
    """Wrong if running the harness without the optional package ends in a traceback instead of one line
    naming the extra to install."""
    blocker = tmp_path / "lm_eval.py"
    blocker.write_text("raise ImportError('blocked for this test', name='lm_eval')\n")
    env_path = f"{tmp_path}:{REPO}"
    result = subprocess.run([sys.executable, str(SCRIPTS / "run_lm_eval.py"), "--help"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": env_path})
    assert result.returncode == 2 and "pip install -e '.[lm-eval]'" in result.stderr
    assert result.stderr.count("\n") == 1
