"""Everything after training works for the GPT-NeoX and Llama-style families, as test_evaluation.py checks it
for GPT-2: eval_loss.py (from the run and from its Hugging Face export) against the trainer's validation loss,
sample.py, HellaSwag scoring and the lm-eval model class against this project's scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_run
from tests.scripts.test_evaluation import harness_loglikelihoods, last_val_loss, local_items, script

MODELS = ("neox_tiny", "llama_tiny")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model trained 4 steps on the quick start's data (shrunk as the trainer tests)."""
    root = tmp_path_factory.mktemp("families")
    for model in MODELS:
        train(compose_train(tiny_run(root / model, root / "data", f"model={model}", steps=4)))
    return {model: root / model for model in MODELS}


@pytest.mark.parametrize("model", MODELS)
def test_eval_loss_of_the_run_and_of_its_export(runs, tmp_path, model):
    """Wrong if a family's run or its export (GPTNeoXForCausalLM, LlamaForCausalLM) loaded other weights or
    another architecture than the one trained."""
    run = runs[model]
    script("eval_loss", run, "--json", tmp_path / "loss.json")
    loss = json.loads((tmp_path / "loss.json").read_text())["loss"]
    assert loss == pytest.approx(last_val_loss(run), rel=1e-6)
    pytest.importorskip("transformers")
    script("export_hf", run, "--out", tmp_path / "hf")
    architecture = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert architecture == {"neox_tiny": "GPTNeoXForCausalLM", "llama_tiny": "LlamaForCausalLM"}[model]
    script("eval_loss", tmp_path / "hf", "--data-dir", run.parent / "data", "--sequences", "8",
           "--batch-size", "4", "--json", tmp_path / "hf.json")
    assert json.loads((tmp_path / "hf.json").read_text())["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_sample_continues_the_prompt_reproducibly(runs, capsys, model):
    args = (runs[model], "--prompt", "ROMEO:", "--max-new-tokens", "150", "--temperature", "1.0",
            "--seed", "3")
    outputs = []
    for _ in range(2):
        script("sample", *args)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ROMEO:") and len(outputs[0]) > 60


@pytest.mark.parametrize("model", MODELS)
def test_hellaswag_and_lm_eval_score_like_our_scorer(runs, monkeypatch, model):
    """The lm-eval model class and HellaSwag scoring on a family's run give this project's scorer's
    log-likelihoods and accuracy."""
    pytest.importorskip("lm_eval")
    from data.tokenizers import get_tokenizer
    from gpt.eval.hellaswag import encode_items, evaluate_hellaswag
    from gpt.eval.lm_eval_model import SophiaGPT
    from gpt.eval.pretrained import load_pretrained
    from gpt.eval.scoring import score_continuations

    lm = SophiaGPT(pretrained=str(runs[model]), device="cpu", batch_size=3)
    results, harness = harness_loglikelihoods(lm, monkeypatch)
    loaded = load_pretrained(runs[model]).model
    items = encode_items(local_items(), get_tokenizer("byte"))
    ours = score_continuations(loaded, [(item.context, e) for item in items for e in item.endings])
    for k in range(len(items)):
        assert harness[k] == pytest.approx([s.logprob for s in ours[4 * k : 4 * k + 4]], abs=1e-4)
    assert results["acc,none"] == evaluate_hellaswag(loaded, items)["acc"]
