"""Data-parallel workers: the mean gradient, decisions taken together, a failed follower."""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest
import torch

from ditarkit.training import parallel
from ditarkit.training.parallel import launch

JOIN_WAIT_SECONDS = 5  # the lead's wait for a follower that will never join; it failed at once


def _gradients(args, workers) -> None:
    """Each worker's gradient is its rank + 1 on one parameter and missing on another (used
    by rank 1 alone) and on a third (used by none)."""
    shared, some, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    shared.grad = torch.full((3,), workers.rank + 1.0)
    if workers.rank == 1:
        some.grad = torch.ones(3)
    workers.average_gradients([shared, some, unused])
    row = {"shared": shared.grad.tolist(), "some": None if some.grad is None else some.grad.tolist(),
           "unused": unused.grad, "mean": workers.mean({"loss": float(workers.rank)}),
           "any": workers.any(workers.rank == 1, False), "gathered": workers.gather(workers.rank)}
    (args.out / f"{workers.rank}.json").write_text(json.dumps(row))


def test_workers_average_gradients_and_decide_together(tmp_path):
    launch(_gradients, argparse.Namespace(out=tmp_path), 2, tmp_path / "stage")
    for rank in (0, 1):
        row = json.loads((tmp_path / f"{rank}.json").read_text())
        assert row["shared"] == [1.5] * 3  # (1 + 2) / 2
        assert row["some"] == [0.5] * 3  # the worker that did not use it counts as zero
        assert row["unused"] is None  # nobody used it: the optimizer skips it, as in one process
        assert row["mean"] == {"loss": 0.5} and row["any"] == [True, False] and row["gathered"] == [0, 1]


def _fail_on_follower(args, workers) -> None:
    if not workers.lead:
        raise ValueError("the follower breaks")
    workers.any(True)  # waits for a follower that is gone


def test_a_failed_follower_ends_the_run_with_one_line_naming_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"training worker 1 failed \(see .*worker-1.log\)"):
        launch(_fail_on_follower, argparse.Namespace(), 2, tmp_path)
    assert "the follower breaks" in (tmp_path / "worker-1.log").read_text()


def _refuse_to_unpickle():
    raise ValueError("this follower cannot start")


class StartsNowhere:
    """Arguments a spawned follower fails on before it can join the group."""

    def __reduce__(self):
        return _refuse_to_unpickle, ()


def _join_only(args, workers) -> None:
    raise AssertionError("the lead must not get past joining")


def test_a_follower_that_dies_before_joining_ends_the_run_instead_of_hanging_it(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "JOIN_SECONDS", JOIN_WAIT_SECONDS)
    with pytest.raises(SystemExit, match=r"training worker 1 failed"):
        launch(_join_only, StartsNowhere(), 2, tmp_path)


SLOW_EXIT_WAIT_SECONDS = 1.0  # the lead's wait for a finished follower to exit; this one never would


def _slow_to_exit(args, workers) -> None:
    """The follower does its work, then its interpreter cannot end: a non-daemon thread
    outlives it, as a loaded machine's torch teardown can outlive the lead's patience."""
    workers.any(True)
    if not workers.lead:
        threading.Thread(target=time.sleep, args=(600,)).start()


def test_a_follower_slow_to_exit_after_its_work_is_stopped_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "FOLLOWER_EXIT_SECONDS", SLOW_EXIT_WAIT_SECONDS)
    started = time.monotonic()
    launch(_slow_to_exit, argparse.Namespace(), 2, tmp_path)  # no SystemExit: the work was done
    assert time.monotonic() - started < 60  # stopped after the wait, not after its thread's 600 s
