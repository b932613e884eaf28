"""This project's models inside lm-evaluation-harness: importing this module registers the model class
`sophia-gpt`, which evaluates a run directory, a checkpoint or Hugging Face GPT-2 weights directly (no export)
with the run's own tokenizer and this project's batched scorer (gpt/eval/scoring.py).

    python scripts/run_lm_eval.py --model sophia-gpt --model_args pretrained=runs/quickstart/adamw \
        --tasks copa

Needs the `lm_eval` extra (`pip install -e '.[lm-eval]'`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from common.errors import UserError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise UserError("lm-evaluation-harness is not installed: pip install -e '.[lm-eval]'") from None

from gpt.distributed import autocast_factory, pick_device
from gpt.eval.continuation import Continuation
from gpt.eval.pretrained import load_pretrained
from gpt.eval.scoring import score_continuations

MODEL_NAME = "sophia-gpt"
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256


@register_model(MODEL_NAME)
class SophiaGPT(TemplateLM):
    """Log-likelihoods, rolling log-likelihoods (perplexity tasks) and greedy generation of one GPT."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = None,
                 dtype: str = "float32", **_: Any) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness's default device
            raise UserError(f"device {device} is not available here; pass --device cpu")
        self._device = pick_device(device or "auto")
        self.loaded = load_pretrained(pretrained, self._device)
        self.model, self.tokenizer_ = self.loaded.model, self.loaded.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.autocast = autocast_factory(self._device, dtype)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size, autocast=self.autocast,
                                     progress=not disable_tqdm)
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's total log-likelihood, in disjoint windows of the model's context."""
        results = []
        for (text,) in tqdm([request.args for request in requests], desc="rolling log-likelihoods",
                            unit="document", disable=disable_tqdm):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1)]
            scores = score_continuations(self.model, windows, batch_size=self.batch_size,
                                         autocast=self.autocast)
            results.append(sum(score.logprob for score in scores))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation, ended at the end-of-text token, cut before the first stop string, or after
        `max_gen_toks` tokens."""
        outputs = []
        for context, kwargs in tqdm([request.args for request in requests], desc="generating",
                                    unit="request", disable=disable_tqdm):
            until = kwargs.get("until") or []
            continuation = Continuation(self.tokenizer_, [until] if isinstance(until, str) else until)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-self.max_length:]

            def on_token(token: torch.Tensor, c: Continuation = continuation) -> bool:
                c.add(token.item())
                return c.done

            with self.autocast():
                self.model.generate(torch.tensor([ids], device=self._device),
                                    int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), temperature=0,
                                    on_token=on_token)
            continuation.finish()
            outputs.append(continuation.text)
        return outputs


LOCAL_TASK_HINT = ("or evaluate a task defined by local files: --include_path docs/examples/lm_eval --tasks "
                   "shakespeare_completion (docs/evaluation.md, 'A local task')")


def harness_cli() -> None:
    """lm-evaluation-harness's own command line, with `sophia-gpt` registered (`sophia-lm-eval`)."""
    from lm_eval.__main__ import cli_evaluate

    with offline_is_one_line():
        cli_evaluate()


@contextmanager
def offline_is_one_line() -> Iterator[None]:
    """A task whose data is neither cached nor reachable (offline, or no network) becomes one line saying
    what to do, not the harness's 40-line traceback."""
    try:
        yield
    except ConnectionError as e:  # datasets' and huggingface_hub's offline errors are ConnectionErrors
        raise UserError(offline_message(e)) from None


def offline_message(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    found = re.search(r"reach '([^']+)'", text)
    what = f"the dataset {found.group(1)!r}" if found else "a dataset"
    return (f"the task needs {what} from the Hugging Face hub, which is not in the local cache and cannot be "
            f"reached ({text}); run the command once with network access (HF_HUB_OFFLINE and "
            f"HF_DATASETS_OFFLINE unset) to cache it, {LOCAL_TASK_HINT}")
