"""AdamW, the paper's baseline: PyTorch's own, with the fused kernel where torch has one.

Registered here so that it is declared like every other optimizer; the registry picks the kernel (fused, or
foreach where no fused kernel exists for the device or dtype), so `fused`/`foreach` are not settings.
"""

from __future__ import annotations

from typing import Any

import torch

from optim.registry import OptimizerEntry, full_size_state, register


def fused_where_supported(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]],
                          kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kwargs, fused=True)
    except RuntimeError:  # no fused kernel for these parameters' device or dtype
        return cls(groups, **kwargs, foreach=True)


register(OptimizerEntry(
    "adamw", lambda: torch.optim.AdamW, full_size_state(2), build=fused_where_supported,
    reserved={"fused": "chosen by the registry: fused kernels where supported",
              "foreach": "chosen by the registry: the fallback where fused kernels are missing"},
))
