"""What the `protocol` choice changes in a run, computed in one place for the trainer and the plan.

The fair protocol treats every optimizer alike. The official one repeats the official Sophia scripts'
asymmetries, the largest being that their AdamW script sums its micro-step losses: the gradient it clips is
the accumulation count times the mean gradient, so the clip threshold on the mean gradient's scale is
train.grad_clip / accumulation. Their validation estimate is `protocol.eval_batches` micro-batches of fresh
random windows (the loader draws them). The warm-up form and the extra final step are read where the schedule
and the step budget are (`optim.schedule`, `gpt.settings`).
"""

from __future__ import annotations

from common.errors import UserError
from gpt.config import BatchPlan, ProtocolSettings, TrainSettings


def micro_loss_divisor(protocol: ProtocolSettings, optim_name: str, plan: BatchPlan) -> int:
    """What each micro-step's mean loss is divided by before its backward: the accumulation count (the
    accumulated gradient is the mean over the global batch), or 1 where the protocol sums (the gradient is
    the sum of the micro-steps' mean gradients on each rank, averaged over ranks as in the official DDP)."""
    return 1 if optim_name in protocol.summed_accumulation else plan.grad_accum_steps


def evaluation_sequences(protocol: ProtocolSettings, train: TrainSettings) -> int:
    """Validation sequences per evaluation over all ranks: the fixed set's `train.eval_sequences`, or
    `protocol.eval_batches` micro-batches of `train.micro_batch_size` fresh windows (the official scripts'
    eval_iters × batch_size, which their rank 0 evaluates alone; here the ranks share them)."""
    if not protocol.eval_batches:
        return train.eval_sequences
    if train.micro_batch_size is None:
        raise UserError(f"protocol.eval_batches={protocol.eval_batches} evaluates micro-batches of "
                        "train.micro_batch_size windows: set train.micro_batch_size to plan the evaluation")
    return protocol.eval_batches * train.micro_batch_size


def describe_protocol(protocol: ProtocolSettings, optim_name: str, plan: BatchPlan, grad_clip: float) -> str:
    """The plan's line on the protocol: its name and what it does differently for this run."""
    differences = []
    divisor = micro_loss_divisor(protocol, optim_name, plan)
    if divisor != plan.grad_accum_steps:
        accum = plan.grad_accum_steps
        clip = (f", so the clip at {grad_clip:g} is {grad_clip / accum:.3g} on the mean gradient"
                if grad_clip > 0 else "")
        differences.append(f"{optim_name}'s {accum} micro-step losses summed{clip}")
    if protocol.warmup_from_zero:
        differences.append("warm-up lr·s/W from 0")
    if protocol.extra_final_step:
        differences.append("one extra final step at min_lr")
    if protocol.eval_batches:
        differences.append(f"validation on {protocol.eval_batches} micro-batches of fresh random windows")
    return f"  protocol: {protocol.name}" + (f" ({'; '.join(differences)})" if differences else "")
