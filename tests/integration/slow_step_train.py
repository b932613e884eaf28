"""`train.py` with every training micro-batch delayed by SLOW_STEP_S seconds: steps longer than torchrun's
default shutdown grace without a model big enough to need that long (for test_preemption.py).
The delay is added here, in the test's own entry point, so the product code has no test hooks."""

import os
import runpy
import sys
import time
from pathlib import Path

from data.loader import BatchLoader

DELAY_S = float(os.environ["SLOW_STEP_S"])
train_batch = BatchLoader.train_batch


def slow_train_batch(self, step, micro_step):
    time.sleep(DELAY_S)
    return train_batch(self, step, micro_step)


BatchLoader.train_batch = slow_train_batch
script = Path(__file__).resolve().parents[2] / "train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
