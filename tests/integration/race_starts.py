"""Two `python train.py` starts racing for one new out_dir, round after round: the test's own entry point for
test_faults.py::test_two_starts_racing_for_a_new_out_dir_never_touch_each_others_files.

The parent imports the trainer once; each round it forks two children that run train.py's entry function on
the same new out_dir, the second after a random stagger, so a round costs no interpreter start-up and
several rounds run at once. The delay that widens the race is added here, not in the product: whichever
child holds the lock (the loser never gets that far) waits, once its log and plan are under way, in its data
loading until the other child has exited, as a slow data preparation, a slow CUDA start or a torchrun
rendezvous would keep it there. Every round is therefore a real race: the loser always meets a live holder.

    python tests/integration/race_starts.py ROOT DATA_DIR ROUNDS [OVERRIDE ...]

prints one JSON line per round: {"round", "out_dir", "exit": [first, second], "stderr": [first, second]}.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt.trainer import Trainer
from tests.hydra_compose import run_train_py, tiny_run

STAGGER_S = 0.5  # the second child starts up to this much later: simultaneous starts and a late one
AT_ONCE = 4  # rounds in flight together (the winners mostly wait)
WAIT_LIMIT_S = 120.0  # a winner never waits longer for the other child than this
open_loader = Trainer._open_loader


def open_loader_once_the_other_child_has_exited(self):
    released = Path.cwd() / "other_exited"
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not released.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return open_loader(self)


Trainer._open_loader = open_loader_once_the_other_child_has_exited


def child(round_dir: Path, index: int, args: list[str], delay: float) -> None:
    """In the forked child: run train.py on `args` with output to files, then exit with its status."""
    os.chdir(round_dir)
    for fd, name in ((1, f"stdout{index}.txt"), (2, f"stderr{index}.txt")):
        os.dup2(os.open(round_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    time.sleep(delay)
    try:
        code = run_train_py(args)
    except BaseException:  # a traceback is a result too: the test reads it from stderr
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_round(root: Path, data: Path, number: int, extra: list[str]) -> dict:
    round_dir = root / f"round{number:03d}"
    round_dir.mkdir(parents=True)
    out = round_dir / "run"
    args = tiny_run(out, data, "train.max_steps=1", "train.eval_interval=1", "train.ckpt_interval=1", *extra)
    pids = []
    for index, delay in enumerate((0.0, random.uniform(0.0, STAGGER_S))):
        pid = os.fork()
        if pid == 0:
            child(round_dir, index, args, delay)
        pids.append(pid)
    return {"round": number, "dir": round_dir, "out_dir": str(out), "pids": pids, "exit": [None, None]}


def main() -> None:
    root, data, rounds, extra = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    random.seed(0)
    # One run in this process first: the children inherit everything it imported and initialised.
    warm = root / "warm-up"
    (warm / "other_exited").parent.mkdir(parents=True)
    (warm / "other_exited").touch()
    os.chdir(warm)
    with open(os.devnull, "w") as quiet:
        saved, sys.stdout = sys.stdout, quiet
        try:
            assert run_train_py(tiny_run(warm / "run", data, "train.max_steps=1", *extra)) == 0
        finally:
            sys.stdout = saved
    pending = list(range(rounds))
    running: dict[int, dict] = {}
    while pending or running:
        while pending and len(running) < AT_ONCE:
            state = start_round(root, data, pending.pop(0), extra)
            for pid in state["pids"]:
                running[pid] = state
        pid, status = os.waitpid(-1, 0)
        state = running.pop(pid)
        state["exit"][state["pids"].index(pid)] = os.waitstatus_to_exitcode(status)
        (state["dir"] / "other_exited").touch()  # the one still running may go on
        if None not in state["exit"]:
            stderr = [(state["dir"] / f"stderr{i}.txt").read_text() for i in (0, 1)]
            print(json.dumps({"round": state["round"], "out_dir": state["out_dir"], "exit": state["exit"],
                              "stderr": stderr}), flush=True)


if __name__ == "__main__":
    main()
