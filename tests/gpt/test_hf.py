"""Hugging Face export and import: the exported model computes this project's logits, the import restores the
weights bit for bit, the exported tokenizer is tiktoken's, and bad input is one line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from data.tokenizers import get_tokenizer
from gpt.eval.hf import export_hf, init_from_hf, load_hf
from gpt.eval.pretrained import init_weights, load_checkpoint
from gpt.model import GPT, GPTConfig
from tests.tiny_model import random_model, write_checkpoint

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_exported_model_computes_the_same_logits(tmp_path, bias, scaled):
    """Wrong if a weight is exported untransposed, a bias or LayerNorm term is lost, the attention scaling or
    the GELU differs, or dropping the vocabulary padding shifts real tokens' logits."""
    extra = {"scale_attn_by_inverse_layer_idx": True} if scaled else {}
    model = random_model(bias=bias, **extra)
    export_hf(model, get_tokenizer("byte"), tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert not hf.config.scale_attn_by_inverse_layer_idx  # a scaled model's factor is in its queries
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0][..., :256]
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_import_restores_the_weights_bit_for_bit(tmp_path):
    """Wrong if the round trip through the Hugging Face folder changes any real weight (then training from
    the import could not continue the original); the padding rows are the one thing not exported."""
    model = random_model()
    export_hf(model, get_tokenizer("byte"), tmp_path / "hf")
    back = GPT(model.config)
    init_from_hf(back, str(tmp_path / "hf"))
    for name, tensor in model.state_dict().items():
        expected = tensor[:256] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
        got = back.state_dict()[name][: len(expected)]
        assert torch.equal(got, expected), name
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.eval()(idx)[0][..., :256], model(idx)[0][..., :256])
        padding = back.transformer.wte.weight[256:]
        assert torch.equal(padding, model.transformer.wte.weight[:256].mean(0).expand_as(padding))
    unpadded, tokenizer = load_hf(str(tmp_path / "hf"))  # evaluation: exactly the exported shapes
    assert unpadded.config.vocab_size == 256 and not unpadded.config.bias and tokenizer.name == "byte"


@pytest.mark.slow
def test_training_from_the_export_continues_like_training_from_the_run(tmp_path, byte_data):
    """Wrong if `train.init_from` of an exported folder starts from other weights than the run it came
    from: the two continuations must agree bit for bit, loss by loss."""
    from gpt.trainer import train
    from tests.hydra_compose import compose_train, tiny_run

    train(compose_train(tiny_run(tmp_path / "a", byte_data, steps=4)))
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), str(tmp_path / "a"),
                    "--out", str(tmp_path / "hf")], check=True, capture_output=True)
    curves = []
    for name, source in (("from_run", tmp_path / "a"), ("from_hf", tmp_path / "hf")):
        train(compose_train(tiny_run(tmp_path / name, byte_data, f"train.init_from={source}", steps=4)))
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves.append([(r.get("train_loss"), r.get("val_loss")) for r in map(json.loads, records)])
    assert curves[0] == curves[1]
    fresh = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert curves[0][0][1] < fresh  # it did start from the trained weights, not from initialisation


def test_sharded_and_single_file_checkpoints_export_alike(tmp_path):
    """Wrong if merging an FSDP-sharded checkpoint's model weights loses or mixes up a tensor."""
    model = random_model()
    single = load_checkpoint(write_checkpoint(model, tmp_path / "single", "byte")).model
    sharded = load_checkpoint(write_checkpoint(model, tmp_path / "sharded", "byte", sharded=True)).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(single.state_dict()[name], tensor), name
        assert torch.equal(sharded.state_dict()[name], tensor), name
    assert sharded.lm_head.weight is sharded.transformer.wte.weight


@pytest.fixture(scope="module")
def gpt2_tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "hf"
    export_hf(random_model(vocab_size=50304), get_tokenizer("gpt2"), folder)
    return folder


TEXTS = ["Hello world", "  leading and trailing   ", "a  b\n\n c\t\td", "It's we'll they've I'm 1234567 x",
         "naïve café 日本語 🤖 Ωμέγα", "\n \n", "ends with a newline\n", "mixed\r\ncrlf  \r\n", "x" * 300,
         "don't DON'T 'quoted' ''double''"]


def test_exported_tokenizer_encodes_like_tiktoken(gpt2_tokenizer_folder):
    """Wrong if a merge is missing or misordered, a byte is spelled wrongly, or the text is split
    differently from tiktoken's pattern: the model would see other ids than it was trained on."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer_folder)
    tiktoken_gpt2 = get_tokenizer("gpt2")
    shakespeare = (REPO / "data" / "samples" / "shakespeare.jsonl").read_text()[:20000]
    for text in [*TEXTS, shakespeare]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == tiktoken_gpt2.encode(text), text[:40]
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256


def test_exported_byte_tokenizer_is_utf8_bytes(tmp_path):
    """Wrong if the byte tokenizer's export gives ids other than the UTF-8 bytes the model was trained on, has
    no end-of-text token as BOS/EOS (lm-eval's `hf` model fails without one), or reads NUL otherwise than the
    project's tokenizer (which drops it: id 0 is the end-of-text token)."""
    export_hf(random_model(), get_tokenizer("byte"), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.encode("a\x00b", add_special_tokens=False) == get_tokenizer("byte").encode("a\x00b")
    assert tokenizer.encode("a<|endoftext|>b", add_special_tokens=False) == [97, 0, 98]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_follow_the_umask(tmp_path, umask):
    """Wrong if a file of the export (model.safetensors was 0600) is not readable as the user's umask says,
    so colleagues sharing a cluster cannot load the weights."""
    old = os.umask(umask)
    try:
        export_hf(random_model(), get_tokenizer("byte"), tmp_path / "hf")
    finally:
        os.umask(old)
    for path in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_scaled_attention_is_folded_into_the_queries_and_generation_config_samples_like_the_project(tmp_path):
    """Wrong if a model scaling attention by layer is exported with the flag that transformers' SDPA before
    5.4 ignores (tests/gpt/test_hf_versions.py runs that version), if the fold computes another function on
    SDPA or eager attention, if importing the export does not give back the scaled model, or if
    generation_config.json does not stop at the end-of-text token or samples with other settings than
    configs/sample.yaml's."""
    from gpt.eval.hf import LAYER_SCALE_KEY
    from gpt.sampling import sampling_defaults

    model = random_model(50304, scale_attn_by_inverse_layer_idx=True)
    export_hf(model, get_tokenizer("gpt2"), tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert config[LAYER_SCALE_KEY] and not config["scale_attn_by_inverse_layer_idx"]
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)[0][..., :50257]
        for attention in ("sdpa", "eager"):
            hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "scaled",
                                                              attn_implementation=attention)
            torch.testing.assert_close(hf(ids).logits, ours, rtol=0, atol=1e-5)
        back, _ = load_hf(str(tmp_path / "scaled"))
        assert back.config.scale_attn_by_inverse_layer_idx
        torch.testing.assert_close(back(ids)[0], ours, rtol=0, atol=1e-5)
    export_hf(random_model(), get_tokenizer("byte"), tmp_path / "plain")
    assert LAYER_SCALE_KEY not in json.loads((tmp_path / "plain" / "config.json").read_text())
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "scaled")
    defaults = sampling_defaults()
    assert generation.eos_token_id == generation.bos_token_id == generation.pad_token_id == 50256
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p,
            generation.max_new_tokens) == (True, defaults.temperature, defaults.top_k, defaults.top_p,
                                           defaults.max_new_tokens)


def test_shape_mismatch_is_one_line(tmp_path):
    """Wrong if loading a model of other shapes fails with a traceback from load_state_dict, or says
    nothing about which keys differ."""
    export_hf(random_model(), get_tokenizer("byte"), tmp_path / "hf")
    with pytest.raises(UserError, match=r"n_layer=2 \(model.n_layer=4\).*n_embd=32 \(model.n_embd=64\)"):
        init_weights(GPT(GPTConfig(n_layer=4, n_head=2, n_embd=64, block_size=16, vocab_size=320)),
                     str(tmp_path / "hf"))
    biased = random_model(bias=True)
    export_hf(biased, get_tokenizer("byte"), tmp_path / "biased")
    with pytest.raises(UserError, match=r"nonzero biases.*model\.bias=true"):
        init_weights(GPT(biased.config.__class__(**{**biased.config.__dict__, "bias": False})),
                     str(tmp_path / "biased"))


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    """Wrong if a non-empty --out, a run without a checkpoint, an unreachable hub name or a missing extra
    ends in a traceback instead of one `error:` line naming the fix."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_hf(random_model(), get_tokenizer("byte"), tmp_path / "out")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), str(tmp_path / "run"),
                             "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "complete checkpoint" in result.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load Hugging Face model 'gpt2-not-cached'"):
        init_weights(random_model(), "gpt2-not-cached")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[hf\]'"):
        export_hf(random_model(), get_tokenizer("byte"), tmp_path / "y")
