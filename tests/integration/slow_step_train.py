"""`train.py` with every training micro-batch from step SLOW_FROM_STEP on (0-based, default 0) delayed by
SLOW_STEP_S seconds: steps longer than a pre-emption grace without a model big enough to need that long (for
test_preemption.py and test_faults.py). The delay is added here, in the test's own entry point, so the
product code has no test hooks."""

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.loader import BatchLoader

DELAY_S = float(os.environ["SLOW_STEP_S"])
FROM_STEP = int(os.environ.get("SLOW_FROM_STEP", "0"))
train_batch = BatchLoader.train_batch


def slow_train_batch(self, step, micro_step):
    if step >= FROM_STEP:
        time.sleep(DELAY_S)
    return train_batch(self, step, micro_step)


BatchLoader.train_batch = slow_train_batch
script = Path(__file__).resolve().parents[2] / "train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
