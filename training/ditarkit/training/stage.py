"""The loop every training stage shares: a time or step budget, checkpoints every few minutes
and on exit (also on Ctrl-C or SIGTERM), exact resume (optimizer, moving average, torch's and
the batch sampler's random states, each worker's own), the log and the curve. With several
data-parallel workers (`parallel.py`) every worker runs this loop in step with the others and
only the lead logs, evaluates and writes."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ditarkit.reference.checkpoint import save_checkpoint
from ditarkit.reference.model import DiTAR
from ditarkit.runtime.fileio import atomic_write
from ditarkit.training.curve import plot_curve
from ditarkit.training.data import log
from ditarkit.training.ema import averaged
from ditarkit.training.parallel import ALONE, Workers

STATE_FILE = "trainer.pt"  # optimizer, step and random states, beside the model checkpoint of a stage
LOG_FILE = "log.jsonl"
CURVE_FILE = "curve.png"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # end a run after its step, with a checkpoint


@dataclass(frozen=True)
class Schedule:
    """The learning rate at each step: a linear warm-up to `peak` over `warmup` steps, then,
    with `decay_steps`, a cosine down to `peak * final` over that many steps, held there after.
    A function of the step alone, so a resumed run continues it exactly."""

    peak: float
    warmup: int
    decay_steps: int = 0
    final: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.decay_steps < 0 or not 0.0 <= self.final <= 1.0:
            raise ValueError(f"not a learning-rate schedule: {self}")

    def __call__(self, step: int) -> float:
        if step + 1 < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if not self.decay_steps:
            return self.peak
        done = min(1.0, (step + 1 - self.warmup) / self.decay_steps)
        return self.peak * (self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * done)))


class Stage:
    """Runs `step()` until the budget is spent; checkpoints every `every` seconds. `sampler`
    (anything with state()/restore()) has its random state saved and restored with the
    optimizer's and torch's. With `ema`, the checkpoint's weights are the moving average
    (`sampling_model`) and the raw weights travel in the trainer state. `workers` are the
    data-parallel processes this one is part of; `seed` starts the random streams of a worker
    the saved state has none for."""

    def __init__(self, name: str, run: Path, model: DiTAR, params: Iterable[torch.nn.Parameter], schedule: Schedule,
                 device: str, sampler: Any = None, ema: float = 0.0, workers: Workers = ALONE,
                 seed: int = 0) -> None:
        self.name, self.dir, self.model, self.device, self.sampler = name, run / name, model, device, sampler
        self.workers, self.seed = workers, seed
        self.dir.mkdir(parents=True, exist_ok=True)
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=schedule.peak, betas=(0.9, 0.98), weight_decay=0.01)
        # only the lead samples, evaluates and saves the average: a follower's would be a copy
        # of the model updated every step for nothing
        self.average = averaged(model, ema) if ema and workers.lead else None
        self.schedule, self.step = schedule, 0
        self.resumed = False
        state = self.dir / STATE_FILE
        if state.is_file():
            self._restore(torch.load(state, map_location="cpu", weights_only=True))
            self._log(f"{name}: resumed at step {self.step}")
        elif not workers.lead:  # a new run: each follower draws its own batches and noise
            self._restore_streams(new_streams(seed, workers.rank))
        self.stop_requested: str | bool = False  # or the name of the signal that asked
        self._handlers: dict[int, object] = {}  # signal -> the handler it had before the run

    def _restore(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.resumed = saved["step"], True
        if saved.get("schedule", asdict(self.schedule)) != asdict(self.schedule):
            self._log(f"{self.name}: the learning rate follows {self.schedule} from step {self.step}; the run "
                      f"saved had {Schedule(**saved['schedule'])}")
        if "model" in saved:  # the checkpoint held the average: the raw weights are here
            self.model.load_state_dict(saved["model"])
        if self.average is not None and "average" in saved:
            self.average.load_state_dict(saved["average"])
        elif self.average is not None:
            self._log(f"{self.name}: the state has no moving average: it starts from the checkpoint's weights")
        elif "average" in saved:
            self._log(f"{self.name}: the moving average in the state is dropped (no --ema): training the raw weights")
        streams = [saved, *saved.get("workers", [])]  # the lead's at the top level, as with one worker
        if len(streams) != self.workers.size:
            self._log(f"{self.name}: the state holds the random streams of {len(streams)} workers, this run has "
                      f"{self.workers.size}: workers without one start new streams, extra ones are dropped")
        if self.workers.rank < len(streams):
            self._restore_streams(streams[self.workers.rank])
        else:  # new, and unlike any earlier run's: the step is part of the seed
            self._restore_streams(new_streams(self.seed, self.workers.rank, self.step))

    def _restore_streams(self, saved: dict) -> None:
        if saved.get("torch_rng") is not None:
            torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if self.sampler is not None and saved.get("sampler_rng") is not None:
            self.sampler.restore(_tuples(saved["sampler_rng"]))

    def _streams(self) -> dict:
        return {"torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "sampler_rng": None if self.sampler is None else self.sampler.state()}

    def _log(self, message: str) -> None:
        if self.workers.lead:
            log(message)

    def _request_stop(self, signum: int, _frame) -> None:
        """The first Ctrl-C or SIGTERM ends the run after this step, with a checkpoint; the
        handlers are given back at once, so a second one stops it at once."""
        self.stop_requested = signal.Signals(signum).name  # logged by the loop: no I/O in a handler
        self._release_signals()

    def _catch_signals(self) -> None:
        """Handle SIGINT and SIGTERM while the run lasts; one ignored (a job started with
        nohup or `&`) stays ignored."""
        self._handlers = {}
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._handlers[signum] = signal.signal(signum, self._request_stop)

    def _release_signals(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)

    def restart_average(self) -> None:
        """The average starts again at the weights as they are (after a change made to them
        outside training, such as balancing the scales of new parts)."""
        if self.average is not None:
            self.average.module.load_state_dict(self.model.state_dict())
            self.average.n_averaged.zero_()

    @property
    def sampling_model(self) -> DiTAR:
        """The weights to sample, evaluate and ship: the moving average when there is one."""
        return self.model if self.average is None else self.average.module

    def save(self) -> None:
        """Checkpoint and trainer state; with several workers every one calls it at the same
        step (their random streams are gathered) and the lead writes."""
        streams = self.workers.gather(self._streams())
        if not self.workers.lead:
            return
        save_checkpoint(self.sampling_model, self.dir)
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "schedule": asdict(self.schedule),
                 **streams[0]}
        if len(streams) > 1:
            state["workers"] = streams[1:]
        if self.average is not None:
            state.update(model=self.model.state_dict(), average=self.average.state_dict())
        atomic_write(self.dir / STATE_FILE, lambda p: torch.save(state, p))

    def average_gradients(self) -> None:
        """The hook between backward and the optimizer step: the workers' mean gradient."""
        self.workers.average_gradients(self.params)

    def record(self, row: dict) -> None:
        with (self.dir / LOG_FILE).open("a") as fh:
            fh.write(json.dumps({"step": self.step, "time": time.time(), **row}) + "\n")

    def run(self, step_fn: Callable[[], dict[str, float]], minutes: float, max_steps: int | None,
            every: float = 300.0, log_every: int = 50, evaluate: Callable[[], dict] | None = None,
            evaluate_every: int = 0) -> None:
        if evaluate and evaluate_every and not self.resumed and self.workers.lead:
            self._evaluate(evaluate)  # the starting point of the curve
        self._catch_signals()
        try:
            self._loop(step_fn, minutes, max_steps, every, log_every, evaluate, evaluate_every)
        finally:
            self._release_signals()
        if self.stop_requested:
            self._log(f"{self.name}: {self.stop_requested}: stopped after step {self.step}, with a checkpoint")
        self.save()
        self._log(f"{self.name}: saved at step {self.step} in {self.dir}")

    def _loop(self, step_fn: Callable[[], dict[str, float]], minutes: float, max_steps: int | None,
              every: float, log_every: int, evaluate: Callable[[], dict] | None, evaluate_every: int) -> None:
        start = last_save = time.time()
        first_step = self.step
        totals: dict[str, float] = defaultdict(float)
        summed = 0
        lead = self.workers.lead
        while True:
            # one decision of all workers, on the lead's clock (the others started theirs while
            # it evaluated step 0); a save due here saves what the end of the last step would have
            now = time.time()
            stop, out_of_time, save_due = self.workers.any(
                bool(self.stop_requested), lead and now - start > minutes * 60, lead and now - last_save > every)
            if stop or out_of_time or (max_steps and self.step >= max_steps):
                break  # run() saves
            if save_due:
                self.save()
                last_save = time.time()
            self.set_lr()
            figures = self.workers.mean(step_fn(), check_keys=self.step == first_step)
            if lead:
                for key, value in figures.items():
                    totals[key] += value
                summed += 1
            if self.average is not None:
                self.average.update_parameters(self.model)
            self.step += 1
            if self.step % log_every == 0 and lead:
                means = {k: v / summed for k, v in totals.items()}
                totals.clear()
                summed = 0
                rate = (self.step - first_step) / max(time.time() - start, 1e-9)
                log(f"{self.name} step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" ({rate:.2f} steps/s)")
                self.record(means)
            if evaluate and evaluate_every and self.step % evaluate_every == 0 and lead:
                self._evaluate(evaluate)

    def _evaluate(self, evaluate: Callable[[], dict]) -> None:
        row = evaluate()
        log(f"{self.name} step {self.step} metrics: " + " ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        self.record(row)
        plot_curve(self.dir / LOG_FILE, self.dir / CURVE_FILE, f"{self.name}: {self.dir}")


def new_streams(seed: int, rank: int, step: int = 0) -> dict:
    """Random streams of worker `rank` starting at `step`, torch's and the batch sampler's: for
    a follower of a new run, or one the saved state has no streams for."""
    mixed = seed + 1_000_003 * rank + 7_919 * step
    return {"torch_rng": torch.Generator().manual_seed(mixed).get_state(),
            "sampler_rng": random.Random(mixed).getstate()}


def _tuples(value):
    """random.Random state survives torch.save as lists; setstate wants tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
