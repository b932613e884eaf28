"""The paper's sweeps (configs/experiment/paper/) launch exactly the paper's runs.

`python train.py -m experiment=paper/<figure>` is run here through train.py's own entry function, with the
training replaced by a recorder, so every job Hydra's sweeper would launch is listed with its resolved config.
If these fail, a figure would train something other than the paper's run (a value differing from
`optim=<o> model=<m>`, a Fig. 5 schedule not spanning its total), miss or add a run, or two different runs
would write into one directory, or a run shared by several figures would be trained twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.hydra_compose import run_train_py

ROOT = Path(__file__).resolve().parents[2]
FIGURES = sorted(p.stem for p in (ROOT / "configs" / "experiment" / "paper").glob("fig*.yaml"))
STEPS = 100_000

# The runs of each figure as they were defined before the figures became sweeps (one file per run, frozen
# here): (model, optimizer, total steps, extra overrides, run directory under runs/paper/). Each such run
# was train.yaml with these choices on OpenWebText with seed 1337, nothing else.
SIZES = {"small": "gpt2_small", "medium": "gpt2_medium", "large": "gpt2_large", "540m": "gpt2_540m"}
Run = tuple[str, str, int, tuple[str, ...], str]


def _run(size: str, optim: str, steps: int = STEPS) -> Run:
    return SIZES[size], optim, steps, (), f"{SIZES[size]}-{optim}-{steps}steps-seed1337"


def _fig7c_cell(optim: str, beta2: float, rho: float) -> Run:
    overrides = (f"optim.betas=[0.965,{beta2}]", f"optim.rho={rho}")
    figure = "fig7c" if optim == "sophia_g" else f"fig7c_{optim}"
    return "gpt2_30m", optim, STEPS, overrides, f"{figure}/beta2_{beta2}-rho{rho}-seed1337"


RUNS: dict[str, list[Run]] = {
    "fig4": [_run(s, o) for s in ("small", "medium", "large")
             for o in ("adamw", "lion", "sophia_h", "sophia_g")],
    "fig5": [_run(s, o, k) for s in ("small", "medium") for o in ("adamw", "sophia_g")
             for k in (100_000, 200_000, 400_000)],
    "fig1c": [_run(s, o) for s in ("small", "medium", "540m", "large") for o in ("adamw", "sophia_h")],
    "fig7c": [_fig7c_cell("sophia_g", b, r) for b in (0.95, 0.99, 0.995) for r in (0.03, 0.05, 0.1, 0.2)],
    "fig7c_sophia_h": [_fig7c_cell("sophia_h", b, r) for b in (0.95, 0.99, 0.995)
                       for r in (0.01, 0.03, 0.05, 0.1, 0.2)],
}
# The official configs (docs/fidelity.md): (lr, min_lr, rho) of the official runs.
TABLE = {("gpt2_small", "adamw"): (6e-4, 3e-5, None), ("gpt2_medium", "adamw"): (3e-4, 6e-5, None),
         ("gpt2_large", "adamw"): (2e-4, 1e-5, None), ("gpt2_small", "sophia_g"): (6e-4, 1.5e-5, 0.05),
         ("gpt2_medium", "sophia_g"): (7e-4, 1e-5, 0.08), ("gpt2_large", "sophia_g"): (3e-4, 1e-5, 0.05)}


def multirun(*args: str) -> list[dict]:
    """The resolved config of every job `python train.py -m ARGS` launches, in launch order."""
    import gpt.trainer

    jobs: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt.trainer, "train",
                      lambda cfg, **_: jobs.append(OmegaConf.to_container(cfg, resolve=True)))
        assert run_train_py(["-m", *args]) == 0
    return jobs


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, list[dict]]:
    """Each figure's jobs; Hydra's multirun.yaml lands in a temporary working directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("sweeps"))
        return {figure: multirun(f"experiment=paper/{figure}") for figure in FIGURES}


@pytest.fixture(scope="module")
def reference() -> Iterator:
    """The config of a frozen run, composed from train.yaml without any paper experiment file."""
    with initialize_config_module("configs", version_base="1.3"):  # clears GlobalHydra on exit
        def compose_run(run: Run) -> dict:
            model, optim, steps, extra, out_dir = run
            overrides = ["data=openwebtext", f"model={model}", f"optim={optim}", "train.seed=1337",
                         f"train.max_steps={steps}", f"out_dir=runs/paper/{out_dir}", *extra]
            return OmegaConf.to_container(compose("train", overrides), resolve=True)
        yield compose_run


def by_dir(jobs: list[dict]) -> dict[str, dict]:
    return {job["out_dir"]: job for job in jobs}


def test_every_figure_is_a_sweep() -> None:
    assert FIGURES == sorted(RUNS)


@pytest.mark.parametrize("figure", sorted(RUNS))
def test_sweep_lists_the_runs_of_the_per_run_files(figure: str, sweeps, reference) -> None:
    """Wrong if a figure's sweep misses a run, adds one, or resolves any value differently from the run
    it replaces (the whole resolved config is compared, the run directory included)."""
    jobs = sweeps[figure]
    assert len(by_dir(jobs)) == len(jobs) == len(RUNS[figure]), "two jobs of one sweep share a directory"
    expected = by_dir([reference(run) for run in RUNS[figure]])
    assert by_dir(jobs).keys() == expected.keys()
    for out_dir, job in by_dir(jobs).items():
        assert job == expected[out_dir], out_dir


def test_a_run_in_several_figures_is_one_run(sweeps) -> None:
    """Figs. 1c, 4 and 5 share their 100K-step runs by directory: only identical runs may share one, and
    125M AdamW at 100K steps is found by all three."""
    runs: dict[str, dict] = {}
    for job in itertools.chain.from_iterable(sweeps.values()):
        assert runs.setdefault(job["out_dir"], job) == job, job["out_dir"]
    assert len(runs) == 12 + 8 + 2 + 12 + 15  # Fig. 4, Fig. 5's longer runs, Fig. 1c's 540M pair, Fig. 7c × 2
    shared = "runs/paper/gpt2_small-adamw-100000steps-seed1337"
    assert all(shared in by_dir(sweeps[f]) for f in ("fig1c", "fig4", "fig5"))


def test_every_job_trains_the_official_model_under_the_fair_protocol(sweeps) -> None:
    """Wrong if any job of a paper sweep (not only the one a plain compose gives) trains plain GPT-2
    attention, or another protocol than the default."""
    for job in itertools.chain.from_iterable(sweeps.values()):
        assert job["model"]["scale_attn_by_inverse_layer_idx"] is True, job["out_dir"]
        assert job["protocol"]["name"] == "fair", job["out_dir"]


def test_fig4_has_the_paper_values(sweeps) -> None:
    for job in sweeps["fig4"]:
        assert job["data"]["name"] == "openwebtext" and job["data"]["tokenizer"] == "gpt2"
        assert job["train"]["global_batch_size"] == 480 and job["model"]["block_size"] == 1024
        assert job["schedule"]["warmup_steps"] == 2000
        key = job["model"]["name"], job["optim"]["name"]
        if key in TABLE:
            assert (job["optim"]["lr"], job["schedule"]["min_lr"], job["optim"].get("rho")) == TABLE[key]


def test_fig5_schedule_follows_the_total(sweeps) -> None:
    for job in sweeps["fig5"]:
        total = job["train"]["max_steps"]
        assert (job["schedule"]["decay_steps"] or total) == total  # null means max_steps in the trainer
        assert f"-{total}steps-" in job["out_dir"]


@pytest.mark.parametrize("figure, optim, lr", [("fig7c", "sophia_g", 1e-3),
                                               ("fig7c_sophia_h", "sophia_h", 1e-3)])
def test_each_fig7c_grid_holds_the_papers_best_cell_for_its_variant(sweeps, figure, optim, lr) -> None:
    """Both variants' grids run on the 30M model at the proposed 30M rate (configs/hparams/gpt2_30m_<optim>),
    vary only β2 and ρ, and contain the paper's best cell (β2 0.99, ρ 0.1)."""
    jobs = sweeps[figure]
    assert {(job["model"]["name"], job["optim"]["name"], job["optim"]["lr"]) for job in jobs} == {
        ("gpt2_30m", optim, lr)}
    assert any(job["optim"]["betas"][1] == 0.99 and job["optim"]["rho"] == 0.1 for job in jobs)


def test_a_model_on_the_command_line_narrows_the_sweep(tmp_path, monkeypatch) -> None:
    """The README's `python train.py -m experiment=paper/fig4 model=gpt2_medium` launches one size."""
    monkeypatch.chdir(tmp_path)
    jobs = multirun("experiment=paper/fig4", "model=gpt2_medium")
    assert [(j["model"]["name"], j["optim"]["name"]) for j in jobs] == [
        ("gpt2_medium", o) for o in ("adamw", "lion", "sophia_h", "sophia_g")]


def test_train_py_prints_one_run_of_a_sweep(capsys) -> None:
    """The real entry point (pkg://configs, not this test's compose) composes one run of a figure."""
    assert run_train_py(["experiment=paper/fig4", "model=gpt2_medium", "optim=sophia_g", "--cfg", "job",
                         "--resolve"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert (cfg.optim.lr, cfg.optim.rho, cfg.out_dir) == (
        7e-4, 0.08, "runs/paper/gpt2_medium-sophia_g-100000steps-seed1337")
