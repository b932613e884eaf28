"""The failure watcher's thread is gone before a rank leaves the process group: a daemon thread caught inside
a store call when the interpreter exits aborts the process (reproduced with two gloo ranks and a thread in
`store.wait`: "terminate called without an active exception", exit code -6, after a successful run)."""

import threading
from types import SimpleNamespace

import gpt.distributed
from gpt.distributed import FailureWatch


class SlowStore:
    """A store whose `add` takes a while, as a store call does while its host is busy or gone."""

    def __init__(self) -> None:
        self.entered = threading.Event()

    def add(self, key: str, amount: int) -> int:
        self.entered.set()
        threading.Event().wait(0.5)
        return 0


def test_finish_waits_for_a_watcher_that_is_inside_a_store_call(monkeypatch):
    """Wrong if `finish` only signalled the thread: it would still be inside `add` when the process group,
    and then the interpreter, went away."""
    store = SlowStore()
    monkeypatch.setattr(gpt.distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(gpt.distributed.dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(FailureWatch, "POLL_S", 0.01)
    watch = FailureWatch(SimpleNamespace(rank=0, distributed=True))
    assert store.entered.wait(5), "the watcher never polled the store"
    watch.finish()
    assert not watch.thread.is_alive()
