"""Run an optimizer study declared in one file: every optimizer tuned the same way, at several budgets, with
end-of-training speed-ups over the baseline and their confidence intervals.

    python scripts/study.py study=<name> [launcher=slurm] [study.dry_run=true] [study.<key>=<value> ...]

`study=<name>` composes configs/study/<name>.yaml with Hydra over the defaults in configs/run_study.yaml;
`launcher=local` (the default) runs several runs at once on this machine, `launcher=slurm` submits job
arrays through submitit. The plan (runs, tokens, FLOPs, GPU-hours) comes first; `study.dry_run=true` stops
there.
Finished runs are found and skipped, interrupted ones resume: rerunning the command continues the study, and
a finished study only rewrites its report (runs/study/<name>/report.md, report.json, figures/). Declaring a
study and reading its report: docs/study.md.
"""

from __future__ import annotations

import logging
import sys

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.cli import run_cli
from common.errors import UserError
from gpt.config import describe_composition_error
from gpt.study.conduct import conduct


def compose_study(overrides: list[str]) -> tuple[str, dict, dict]:
    """(study name, its composed file, the launcher group) for the command line's overrides."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="configs", version_base="1.3"):
            cfg = compose(config_name="run_study", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.choices.study} in the defaults
        name = cfg.hydra.runtime.choices.study
        return (name, OmegaConf.to_container(cfg.study, resolve=True),
                OmegaConf.to_container(cfg.launcher, resolve=True))
    except HydraException as error:
        raise UserError(describe_composition_error(error)) from None
    except OmegaConfBaseException as error:
        raise UserError(f"study file: {str(error).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def show_progress() -> None:
    """The study's and the data preparation's progress lines on standard output, as plain lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("gpt.study", "data"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    show_progress()
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(__doc__)
        return
    conduct(*compose_study(overrides))


if __name__ == "__main__":
    run_cli(main)
