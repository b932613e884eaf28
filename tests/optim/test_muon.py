"""Muon + AdamW (`optim=muon`): which parameters each part steps, the Newton-Schulz result against the SVD's
polar factor, and every step against torch's own Muon and AdamW driven by hand on separate q, k and v."""

import pytest
import torch
from torch import nn

from gpt.model import GPT, GPTConfig
from optim import MuonAdamW, build_optimizer
from optim.muon import muon_param_groups
from tests.tiny_model import tiny_gpt

HIDDEN = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.mark.parametrize("bias", [False, True])
def test_every_hidden_matrix_is_under_muon_and_everything_else_under_adamw(bias):
    """GPT-2 small itself (on the meta device): wrong if an embedding, the tied head, a LayerNorm or a
    bias were orthogonalised, a hidden matrix left to AdamW, or a parameter (the tied wte/lm_head) stepped
    twice."""
    with torch.device("meta"):
        model = GPT(GPTConfig(bias=bias))
    optimizer = build_optimizer({"name": "muon"}, model, tokens_per_step=480 * 1024)
    names = {use_muon: [name for group in optimizer.param_groups if group["use_muon"] == use_muon
                        for name in group["param_names"]] for use_muon in (True, False)}
    expected_muon = {f"transformer.h.{i}.{part}.weight" for i in range(12) for part in HIDDEN}
    expected_adamw = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} | {
        f"transformer.h.{i}.{ln}.weight" for i in range(12) for ln in ("ln_1", "ln_2")}
    if bias:
        expected_adamw |= {"transformer.ln_f.bias"} | {f"transformer.h.{i}.{part}.bias" for i in range(12)
                                                       for part in ("ln_1", "ln_2", *HIDDEN)}
    assert sorted(names[True]) == sorted(expected_muon)  # sorted lists: a name listed twice would show
    assert sorted(names[False]) == sorted(expected_adamw)
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in stepped}) == len(stepped) == len(list(model.parameters()))
    assert model.lm_head.weight is model.transformer.wte.weight  # the head is stepped as wte, by AdamW
    adamw_decay = [group["weight_decay"] for group in optimizer.param_groups if not group["use_muon"]]
    assert adamw_decay == [0.0], "embeddings, LayerNorms and biases never decay (the project's rule)"


class FusedAttentionInput(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width, bias=False)


def test_newton_schulz_is_close_to_the_polar_factor_of_each_of_q_k_v():
    """One step with lr 1, no momentum and no decay moves each block by NS(G_block). Keller Jordan's
    documentation (repeated in torch.optim.Muon's) says five quintic iterations give U·S'·Vᵀ with S' within
    about [0.5, 1.5] instead of U·Vᵀ: so ‖NS(G) − UVᵀ‖₂ ≤ 0.5, for singular values not tiny next to the
    largest (here within 10× of it); measured 0.32. Wrong if the stacked 3C×C matrix were orthogonalised as
    one: its blocks are then far from their own polar factors (measured 0.97-1.03 from them)."""
    width = 32
    torch.manual_seed(0)
    model = FusedAttentionInput(width)
    blocks = []
    for _ in range(3):
        u, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
        blocks.append(u @ torch.diag(torch.empty(width, dtype=torch.float64).uniform_(0.1, 1.0)) @ v.T)
    gradient = torch.cat(blocks)
    optimizer = MuonAdamW(muon_param_groups(model, {}, {"weight_decay": 0.0}), lr=1.0, momentum=0.0,
                          nesterov=False, weight_decay=0.0)
    before = model.c_attn.weight.detach().clone()
    model.c_attn.weight.grad = gradient.float()
    optimizer.step()
    update = (before - model.c_attn.weight.detach()).double()
    u, _, vh = torch.linalg.svd(gradient, full_matrices=False)
    whole = u @ vh  # the polar factor of the stacked matrix
    for i, block in enumerate(blocks):
        rows = slice(i * width, (i + 1) * width)
        u, _, vh = torch.linalg.svd(block)
        own = torch.linalg.matrix_norm(update[rows] - u @ vh, ord=2).item()
        assert own <= 0.5, (i, own)
        stacked = torch.linalg.matrix_norm(update[rows] - whole[rows], ord=2).item()
        assert stacked > 0.5, (i, stacked)


def test_steps_equal_torch_muon_and_adamw_driven_by_hand_on_separate_q_k_v():
    """Five steps of `optim=muon` on a tiny GPT against torch.optim.Muon over separate q, k, v (and the other
    hidden matrices) plus torch.optim.AdamW over the rest, fed the same gradients; each part's learning rate
    is changed before step 3, as a schedule does. Bit-identical parameters. Wrong if a block, a momentum
    buffer or a rate were mixed up, or a group's own rate did not reach the part that steps it."""
    model = tiny_gpt(n_embd=16, block_size=8, vocab_size=13, bias=True)
    cfg = {"name": "muon", "lr": 0.02, "weight_decay": 0.1, "adamw_lr": 3e-3,
           "adjust_lr_fn": "match_rms_adamw"}
    optimizer = build_optimizer(cfg, model, tokens_per_step=16)
    hidden = {name for group in optimizer.param_groups if group["use_muon"] for name in group["param_names"]}

    def leaf(tensor):
        return tensor.detach().clone().requires_grad_()

    reference: dict[str, list[tuple[slice, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        thirds = [slice(i * 16, (i + 1) * 16) for i in range(3)]
        rows = thirds if name.endswith("c_attn.weight") else [slice(None)]
        reference[name] = [(r, leaf(param[r])) for r in rows]
    muon = torch.optim.Muon([t for n in sorted(hidden) for _, t in reference[n]], lr=0.02, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([t for n, parts in reference.items() if n not in hidden for _, t in parts],
                              lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    for step in range(5):
        if step == 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
            for by_hand in (muon, adamw):
                by_hand.param_groups[0]["lr"] *= 0.5
        x = torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x, x)[1].backward()
        for name, param in model.named_parameters():
            for rows, tensor in reference[name]:
                tensor.grad = param.grad[rows].clone()
        optimizer.step()
        muon.step()
        adamw.step()
    for name, param in model.named_parameters():
        for rows, tensor in reference[name]:
            assert torch.equal(param.detach()[rows], tensor.detach()), name
