"""Train a GPT: `python train.py [experiment=...] [optim=...] [model=...] [key=value ...]`, or under torchrun.

A thin Hydra entry point; the run is `gpt.trainer.train`. User errors print one line and exit 2, and so do
config errors Hydra finds while composing (an unknown `model=`, a misspelt key): Hydra would print a report of
a dozen lines and exit 1. To receive those errors we set HYDRA_FULL_ERROR=1, Hydra's documented switch for
raising instead of reporting; a user who sets it themselves gets Hydra's full report and traceback.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from common.cli import run_cli

_job_started = False  # set when Hydra hands over to the job: errors before it are Hydra's set-up

@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="train")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    from gpt.trainer import train

    run_cli(lambda: train(cfg, keep_process_group=HydraConfig.get().mode == RunMode.MULTIRUN))


def run() -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's own report
        main()
    else:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            main()
        except HydraException as e:
            from gpt.config import describe_composition_error

            print(f"error: {describe_composition_error(e)}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if _job_started:  # raised by the run itself: a bug or a failure that keeps its traceback
                raise
            # Hydra creates the run directory (out_dir) before the job: a file in its place, a parent that
            # is a file, no permission
            print(f"error: cannot create out_dir {e.filename} ({e.strerror}); choose a directory you can "
                  "write", file=sys.stderr)
            sys.exit(2)
    if "gpt.trainer" in sys.modules:  # a job ran; a multirun keeps its process group up until here
        from gpt.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    run()
