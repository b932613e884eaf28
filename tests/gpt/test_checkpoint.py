"""The finiteness check that guards every save: it must see a NaN or inf in any weight or optimizer-state
tensor, and only there (integer state such as a step count is not a float and is skipped)."""

from __future__ import annotations

import pytest
import torch

from gpt.checkpoint import first_nonfinite
from tests.tiny_model import stepped


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["weight", "optimizer"])
def test_a_single_non_finite_element_is_found_and_named(where, value):
    """Wrong if one bad element in a weight or in Adam's second moment passes the check (the checkpoint
    would then be written and resumed into garbage), or if the report names another tensor."""
    model, optimizer = stepped()
    assert first_nonfinite(model, optimizer) is None
    param = model.transformer.h[0].mlp.c_fc.weight
    target = param if where == "weight" else optimizer.state[param]["exp_avg_sq"]
    with torch.no_grad():
        target[3, 5] = value
    problem = first_nonfinite(model, optimizer)
    expected = ("weight " if where == "weight" else "optimizer state exp_avg_sq of ") + \
        "transformer.h.0.mlp.c_fc.weight"
    assert problem == expected


def test_single_file_checkpoint_under_fsdp_says_what_is_supported(tmp_path):
    """Wrong if a single-file checkpoint resumed sharded fails obscurely or names a layout that cannot load
    it: it loads as one process or DDP on any number of ranks, and says so."""
    from common.errors import UserError
    from gpt.checkpoint import load_training_state, save_training_state

    model, optimizer = stepped()
    save_training_state(tmp_path, model, optimizer, {}, sharded=False, is_main=True)
    with pytest.raises(UserError, match=r"cannot be resumed sharded; resume it with train.strategy=ddp \(any "
                                        r"number of ranks\) or as one process"):
        load_training_state(tmp_path, model, optimizer, {}, sharded=True, device=torch.device("cpu"))
    load_training_state(tmp_path, model, optimizer, {}, sharded=False, device=torch.device("cpu"))
