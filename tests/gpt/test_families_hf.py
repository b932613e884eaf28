"""Each family against transformers' own implementation (GPT2LMHeadModel, GPTNeoXForCausalLM,
LlamaForCausalLM), both directions of the conversion, from random weights built offline: the logits to fp32
rounding, the weights bit for bit, greedy generation token for token, and what has no counterpart refused."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from data.tokenizers import get_tokenizer
from gpt.eval.hf import TOKENIZER_KEY, export_hf, load_hf
from gpt.eval.pretrained import init_weights
from gpt.model import GPT
from tests.gpt.test_families import FAMILIES, small, tokens

transformers = pytest.importorskip("transformers")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


def hf_kind(name: str) -> str:
    return name.split("_")[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_computes_transformers_logits(tmp_path, name):
    """Ours → Hugging Face: wrong if a tensor is mapped, transposed or permuted wrongly (NeoX's per-head
    q/k/v rows, Llama's split q/k/v), a bias, norm or rotary detail (fraction, base, layout) differs, or
    the head's tying is lost."""
    model = small(name)
    export_hf(model, get_tokenizer("byte"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == HF_CLASS[hf_kind(name)]
    idx = tokens(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0][..., :256], rtol=1e-5, atol=1e-5)


def random_hf(kind: str, **config) -> torch.nn.Module:
    """A transformers model built offline from its own config class, every weight random; its config names
    the byte tokenizer as this project's exports do."""
    classes = {"gpt2": "GPT2Config", "neox": "GPTNeoXConfig", "llama": "LlamaConfig"}
    config = {**config, "bos_token_id": 0, "eos_token_id": 0, TOKENIZER_KEY: "byte"}
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASS[kind])(getattr(transformers, classes[kind])(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


HF_MODELS = {
    "gpt2": ("gpt2", dict(vocab_size=256, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                          activation_function="gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6)),
    "neox": ("neox", dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=80, rotary_pct=0.25, rotary_emb_base=1000,
                          max_position_embeddings=16, use_parallel_residual=True, tie_word_embeddings=False)),
    "neox_sequential": ("neox", dict(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, rotary_pct=1.0,
                                     max_position_embeddings=16, use_parallel_residual=False,
                                     attention_bias=False, hidden_act="gelu_new")),
    "llama": ("llama", dict(vocab_size=256, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, rms_norm_eps=1e-5,
                            rope_theta=20000.0, tie_word_embeddings=False)),
    "llama_bias_tied": ("llama", dict(vocab_size=256, hidden_size=32, intermediate_size=72,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_computes_transformers_logits(tmp_path, name):
    """Hugging Face → ours, from a model transformers built itself: wrong if reading its config (rotary
    base and fraction, parallel residual, activation, widths, eps, tying, biases) or its tensors goes
    wrong."""
    kind, config = HF_MODELS[name]
    hf = random_hf(kind, **config)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_hf(str(tmp_path / "hf"))
    idx = tokens(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["neox", "llama"])
def test_round_trip_restores_every_weight(tmp_path, name):
    """Export then `train.init_from` the folder: every real weight back bit for bit (the vocabulary padding
    rows of an untied head too come back as the mean row)."""
    model = small(name)
    export_hf(model, get_tokenizer("byte"), tmp_path / "hf")
    back = GPT(model.config)
    init_weights(back, str(tmp_path / "hf"))
    for key, tensor in model.state_dict().items():
        rows = 256 if key in ("transformer.wte.weight", "lm_head.weight") else len(tensor)
        assert torch.equal(back.state_dict()[key][:rows], tensor[:rows]), key
    head = back.lm_head.weight[256:]
    assert torch.equal(head, model.lm_head.weight[:256].mean(0).expand_as(head))


def test_configs_no_architecture_computes_are_refused_in_one_line(tmp_path):
    """Wrong if an export wrote a folder that some transformers class would load as another function."""
    with pytest.raises(UserError, match=r"LlamaForCausalLM needs .*mlp='swiglu'"):
        export_hf(small("llama", mlp="gelu"), get_tokenizer("byte"), tmp_path / "a")
    with pytest.raises(UserError, match=r"GPTNeoXForCausalLM needs scale_attn_by_inverse_layer_idx=False"):
        export_hf(small("neox", scale_attn_by_inverse_layer_idx=True), get_tokenizer("byte"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_llama_variants_this_model_lacks_are_refused(tmp_path, change, message):
    """Grouped-query attention, scaled rotary positions, another activation: one line, not wrong logits."""
    _, config = HF_MODELS["llama"]
    random_hf("llama", **{**config, **change}).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match=message):
        load_hf(str(tmp_path / "hf"))


def test_init_from_a_model_of_another_family_names_the_differences(tmp_path):

    export_hf(small("neox"), get_tokenizer("byte"), tmp_path / "hf")
    with pytest.raises(UserError, match=r"rotary_fraction=0.25 \(model.rotary_fraction=1.0\).*norm"):
        init_weights(small("llama"), str(tmp_path / "hf"))


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_greedy_decoding_equals_the_exports_generate(tmp_path, name):
    """Ours (cached) against transformers' generate on the exported model, within the context (the
    vocabulary unpadded: random padding rows, which training would push down, are not exported)."""
    model = small(name, vocab_size=256)
    export_hf(model, get_tokenizer("byte"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = tokens(2, 4)
    ours = model.generate(prompt, 12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert theirs.shape == ours.shape and torch.equal(ours, theirs)
