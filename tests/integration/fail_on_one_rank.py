"""train.py's entry point with an error injected on one rank in the middle of a step, between its two
micro-steps: what an out-of-memory error on one GPU looks like to the other ranks. The rank, the step and a
file that records when the error was raised come from the environment (FAIL_RANK, FAIL_STEP, FAIL_STAMP)."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.loader import BatchLoader

original = BatchLoader.train_batch


def failing_train_batch(self, step: int, micro_step: int):
    if self.rank == int(os.environ["FAIL_RANK"]) and step == int(os.environ["FAIL_STEP"]) and micro_step == 1:
        Path(os.environ["FAIL_STAMP"]).write_text(str(time.time()))
        raise RuntimeError(f"injected failure on rank {self.rank}")
    return original(self, step, micro_step)


BatchLoader.train_batch = failing_train_batch

import train  # noqa: E402

if __name__ == "__main__":
    train.run()
