"""Data-parallel training on the cores of one machine.

A step of the small models is bound by PyTorch's per-operation overhead, not by arithmetic, so
a second thread in one process leaves the second core idle. N worker processes, each with its
own share of the batch and its own random streams, average their gradients before every
optimizer step (torch.distributed, gloo), so the N copies of the weights stay identical.
Worker 0 (the lead, this process) logs, evaluates and checkpoints; the others follow it: a
stop signal or the time budget seen by the lead ends every worker after the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The lead evaluates (export, Whisper) while the others wait at their next step's collective.
WAIT_FOR_LEAD = datetime.timedelta(hours=3)
# a follower's interpreter winds torch down after its socket has closed: the lead waits this
# long for its exit code (the wait ends as soon as it has exited; a loaded machine is slow)
FOLLOWER_EXIT_SECONDS = 60.0
JOIN_SECONDS = 300  # each follower starts a fresh interpreter and imports torch: slow on a loaded machine


@dataclass(frozen=True)
class Workers:
    """This process's place among the workers. With one worker every method is the identity,
    and nothing of torch.distributed is touched."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every worker's gradients become their mean. A parameter no worker used keeps no
        gradient (the optimizer skips it, as it would in one process); one used by some is
        averaged with zeros from the others."""
        if self.size == 1:
            return
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [used])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p, anyone in zip(params, flat[-len(params):].tolist()):
            n = p.numel()
            # views of the one reduced buffer: the optimizer reads them in place, and zero_grad
            # drops them before the next backward
            p.grad = flat[offset : offset + n].view_as(p) if anyone else None
            offset += n

    def mean(self, values: dict[str, float], check_keys: bool = False) -> dict[str, float]:
        """The workers' mean of each logged figure (their shares of one batch). `check_keys`
        first checks that every worker logs the same terms (once is enough: the terms follow
        from the run's options, not from the batch)."""
        if self.size == 1:
            return values
        keys = list(values)
        if check_keys and (every := self.gather(keys)) != [keys] * self.size:
            raise ValueError(f"the workers' loss terms differ: {every}")  # a mean would mix the figures
        summed = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(summed)
        return {k: v / self.size for k, v in zip(keys, summed.tolist())}

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true where any worker holds it true: the workers decide together."""
        if self.size == 1:
            return flags
        held = torch.tensor([float(f) for f in flags])
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in held.tolist())

    def gather(self, value: Any) -> list:
        """Every worker's `value`, in rank order (on every worker)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def share_weights(self, module: torch.nn.Module) -> None:
        """Every worker takes the lead's parameters and buffers."""
        if self.size == 1:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)

    @contextlib.contextmanager
    def lead_first(self) -> Iterator[None]:
        """The block runs on the lead before the others start it (the lead fills a cache the
        others then read)."""
        if not self.lead:
            dist.barrier()
        yield
        if self.lead and self.size > 1:
            dist.barrier()


ALONE = Workers()  # a run in one process


def log_file(run_stage: Path, rank: int) -> Path:
    """Where a follower writes its messages (the lead's go to stderr)."""
    return run_stage / f"worker-{rank}.log"


def launch(work: Callable[[Any, Workers], None], args: Any, size: int, run_stage: Path) -> None:
    """Run `work(args, workers)` in `size` processes: this one is the lead, the others are
    started fresh (spawn) and write their messages to `log_file`. A follower that fails ends
    the run with one line naming its log; one that has done its work and is slow to exit (a
    loaded machine winding torch down) is stopped, not counted as failed."""
    port = _free_port()
    run_stage.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    finished = [context.Event() for _ in range(1, size)]
    followers = [context.Process(target=_follow, args=(work, args, rank, size, port, run_stage, finished[rank - 1]),
                                 daemon=True) for rank in range(1, size)]
    for process in followers:
        process.start()
    try:
        _join_group(0, size, port)
        work(args, Workers(0, size))
    except RuntimeError as failure:  # a follower went away before joining or mid-collective
        broken = _failed(followers, finished, FOLLOWER_EXIT_SECONDS)  # its socket closes a moment before it exits
        if not broken:
            raise
        first_line = (str(failure).splitlines() or [type(failure).__name__])[0][:200]
        raise SystemExit(f"error: training worker {broken[0]} failed (see {log_file(run_stage, broken[0])}): "
                         f"{first_line}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _end(followers)
    broken = _failed(followers, finished, 0.0)
    if broken:
        raise SystemExit(f"error: training worker {broken[0]} failed (see {log_file(run_stage, broken[0])})")


def _failed(followers: list, finished: list, wait_seconds: float) -> list[int]:
    """The ranks of the followers that have exited with an error, or were stopped, before
    their work was done, after up to `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    for process in followers:
        process.join(max(0.0, deadline - time.monotonic()))
    return [rank for rank, (process, done) in enumerate(zip(followers, finished), 1)
            if process.exitcode and not done.is_set()]


def _end(followers: list) -> None:
    """Followers still running once the lead is done are killed: they ignore SIGTERM (the
    lead stops them through the group), and one blocked in a collective would never return."""
    for process in followers:
        process.join(FOLLOWER_EXIT_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


def _follow(work: Callable[[Any, Workers], None], args: Any, rank: int, size: int, port: int,
            run_stage: Path, finished: Any) -> None:
    # the lead decides when to stop and tells the others; a Ctrl-C reaching the whole
    # process group must not break a follower out of a collective
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    messages = open(log_file(run_stage, rank), "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    for fd in (1, 2):  # what torch's C++ side and gloo print, too
        os.dup2(messages.fileno(), fd)
    sys.stderr = sys.stdout = messages
    _join_group(rank, size, port)
    try:
        work(args, Workers(rank, size))
        finished.set()  # what remains (the group's and torch's teardown) may be cut short
    finally:
        dist.destroy_process_group()


def _join_group(rank: int, size: int, port: int) -> None:
    """Join the group through the lead's store: the lead waits `JOIN_SECONDS` at most for
    every follower, so one that dies before joining ends the run instead of hanging it."""
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, wait_for_workers=True,
                          timeout=datetime.timedelta(seconds=JOIN_SECONDS))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=WAIT_FOR_LEAD)


def _free_port() -> int:
    """A port free now (another program could take it before the lead binds it: then the
    run fails at once with the store's error, and a new start picks another)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
