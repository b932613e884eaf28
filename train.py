"""Train a GPT: `python train.py [experiment=...] [optim=...] [model=...] [key=value ...]`, or under torchrun.

A thin Hydra entry point; the run is `gpt.trainer.train`. User errors print one line and exit 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from data.errors import UserError


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from gpt.trainer import train

    try:
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
