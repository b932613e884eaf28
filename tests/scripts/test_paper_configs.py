"""The paper's experiment configs (configs/experiment/paper/) compose into the paper's runs.

If these fail, `python train.py experiment=paper/<name>` would train something other than the paper's run:
a Fig. 4 run whose values differ from `optim=<o> model=<m>` (the hparams specialisation did not apply), a
Fig. 5 run whose LR schedule does not span its total steps, two different runs writing into one directory,
or a Fig. 7c sweep whose jobs overwrite each other.
"""

from __future__ import annotations

import functools
import itertools
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "experiment" / "paper"
NAMES = sorted(p.stem for p in PAPER.glob("*.yaml") if not p.stem.startswith("_"))
SIZES = {"small": "gpt2_small", "medium": "gpt2_medium", "large": "gpt2_large", "540m": "gpt2_540m"}
# The official configs (docs/fidelity.md): (lr, min_lr, rho) of the official runs.
TABLE = {("small", "adamw"): (6e-4, 3e-5, None), ("medium", "adamw"): (3e-4, 6e-5, None),
         ("large", "adamw"): (2e-4, 1e-5, None), ("small", "sophia_g"): (6e-4, 1.5e-5, 0.05),
         ("medium", "sophia_g"): (7e-4, 1e-5, 0.08), ("large", "sophia_g"): (3e-4, 1e-5, 0.05)}

Compose = Callable[..., DictConfig]  # cached: tests must not modify what it returns


@pytest.fixture(scope="module")
def compose_train() -> Iterator[Compose]:
    with initialize_config_module("configs", version_base="1.3"):  # clears GlobalHydra on exit
        yield functools.cache(lambda *overrides, hydra=False: compose("train", list(overrides),
                                                                      return_hydra_config=hydra))


def paper(compose_train: Compose, name: str) -> DictConfig:
    return compose_train(f"experiment=paper/{name}")


def run_identity(cfg: DictConfig) -> dict:
    """What is trained: everything but the run directory and the settings that do not change the run."""
    return OmegaConf.to_container(cfg, resolve=True) | {"out_dir": None, "wandb": None}


def test_there_is_a_config_per_run() -> None:
    expected = {f"fig4_{s}_{o}" for s in ("small", "medium", "large")
                for o in ("adamw", "lion", "sophia_h", "sophia_g")}
    expected |= {f"fig5_{s}_{o}_{k}k" for s in ("small", "medium") for o in ("adamw", "sophia_g")
                 for k in (100, 200, 400)}
    expected |= {f"fig1c_{s}_{o}" for s in ("small", "medium", "540m", "large")
                 for o in ("adamw", "sophia_h")}
    assert set(NAMES) == expected | {"fig7c_30m_grid"}


@pytest.mark.parametrize("name", NAMES)
def test_every_config_composes_on_openwebtext_with_a_seed(compose_train: Compose, name: str) -> None:
    cfg = paper(compose_train, name)
    assert cfg.data.name == "openwebtext" and cfg.data.tokenizer == "gpt2"
    assert cfg.out_dir.startswith("runs/paper/") and cfg.out_dir.endswith(f"seed{cfg.train.seed}")


def test_runs_of_a_figure_share_the_seed(compose_train: Compose) -> None:
    for figure in ("fig4", "fig5", "fig1c"):
        assert len({paper(compose_train, n).train.seed for n in NAMES if n.startswith(figure + "_")}) == 1


def test_a_shared_run_directory_means_the_same_run(compose_train: Compose) -> None:
    """Figs. 1c, 4 and 5 share their 100K-step runs by directory: only identical runs may share one."""
    by_dir: dict[str, dict] = {}
    for name in NAMES:
        cfg = paper(compose_train, name)
        assert by_dir.setdefault(cfg.out_dir, run_identity(cfg)) == run_identity(cfg), name
    shared = paper(compose_train, "fig1c_small_adamw").out_dir
    assert shared == paper(compose_train, "fig4_small_adamw").out_dir
    assert len(by_dir) == len(NAMES) - 4 - 6  # fig5's four 100K runs and 6 of fig1c's 8 are fig4 runs


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("fig4_")])
def test_fig4_equals_the_command_line_choice(compose_train: Compose, name: str) -> None:
    _, size, optim = name.split("_", 2)
    cfg = paper(compose_train, name)
    direct = compose_train(f"optim={optim}", f"model={SIZES[size]}")
    for key in ("model", "optim", "schedule", "train.max_steps", "train.global_batch_size"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(direct, key), key
    assert cfg.train.max_steps == 100_000 and cfg.train.global_batch_size == 480
    assert cfg.model.block_size == 1024 and cfg.schedule.warmup_steps == 2000
    if (size, optim) in TABLE:
        lr, min_lr, rho = TABLE[size, optim]
        assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.optim.get("rho")) == (lr, min_lr, rho)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("fig5_")])
def test_fig5_schedule_follows_the_total(compose_train: Compose, name: str) -> None:
    total = int(re.search(r"_(\d+)k$", name).group(1)) * 1000
    cfg = paper(compose_train, name)
    assert cfg.train.max_steps == total
    assert (cfg.schedule.decay_steps or cfg.train.max_steps) == total  # null means max_steps in the trainer
    assert str(total) in cfg.out_dir


def test_fig1c_uses_sophia_h_at_540m(compose_train: Compose) -> None:
    cfg = paper(compose_train, "fig1c_540m_sophia_h")
    assert (cfg.model.name, cfg.optim.name) == ("gpt2_540m", "sophia_h")


def test_fig7c_sweep_gives_one_directory_per_cell(compose_train: Compose) -> None:
    """Expand hydra.sweeper.params as Hydra's basic sweeper does (the cartesian product of the choices)."""
    params = compose_train("experiment=paper/fig7c_30m_grid", hydra=True).hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in overrides]
    cells = []
    for cell in itertools.product(*axes):
        cfg = compose_train("experiment=paper/fig7c_30m_grid", *cell)
        assert (cfg.model.name, cfg.optim.name) == ("gpt2_30m", "sophia_g")
        cells.append((cfg.optim.betas[1], cfg.optim.rho, cfg.out_dir))
        assert f"beta2_{cfg.optim.betas[1]}-rho{cfg.optim.rho}-" in cfg.out_dir
    assert len({out_dir for *_, out_dir in cells}) == len(cells) >= 9
    assert any(beta2 == 0.99 and rho == 0.1 for beta2, rho, _ in cells)  # the paper's best cell


def test_train_py_prints_the_composed_job() -> None:
    """The real entry point (pkg://configs, not this test's compose) takes an experiment in a subdirectory."""
    command = [sys.executable, str(ROOT / "train.py"), "experiment=paper/fig4_medium_sophia_g",
               "--cfg", "job", "--resolve"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    cfg = OmegaConf.create(result.stdout)
    assert (cfg.optim.lr, cfg.optim.rho, cfg.out_dir) == (
        7e-4, 0.08, "runs/paper/gpt2_medium-sophia_g-100000steps-seed1337")
