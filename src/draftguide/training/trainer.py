"""The training loop's machinery, independent of the draft recipe: resumable state, the LR schedule, time-budget
re-planning, the data order, checkpoints, signals and log rows. `train.train_draft` is the loop over these.

Every piece is a small function or class testable on its own; those that touch torch.distributed take the rank
and world size as arguments (world 1: no collective is called)."""

from __future__ import annotations

import functools
import math
import os
import random
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

PROBE_STEPS = 10  # steps timed (after this run's first, which pays one-off costs) before a budget is planned
REPLAN_EVERY = 50  # then re-planned every this many steps from the mean step time of the run so far


# -- state ----------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a resumed run needs besides weights and RNGs; saved as a plain dict (`checkpoint.pt["state"]`)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    pos: int = 0  # index of the next batch's first sample in the epoch's order
    seed: int = 0
    scale_fitted: bool = False  # the feature scale is fitted on the first batch, then kept
    elapsed_s: float = 0.0  # wall time of all earlier runs of this training (this run's is added on exit)
    total: int = 1  # planned optimizer steps; a time budget re-plans it
    planned: bool = False  # `total` comes from a time-budget plan
    labels_seen: int = 0  # labels in the loss so far, over all ranks

    def to_dict(self) -> dict:
        return asdict(self)

    def load_dict(self, d: dict) -> None:
        """Update in place from a saved dict (keys an older checkpoint lacks keep their defaults). In place because
        the LR schedule holds this object."""
        names = {f.name for f in fields(self)}
        for k, v in d.items():
            if k in names:
                setattr(self, k, v)


# -- LR schedule ----------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup_ratio * total` steps (at least 1), then cosine to 0 at `total`."""
    warm = max(1, int(warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def lr_schedule(
    opt: torch.optim.Optimizer, state: TrainState, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler that reads `state.total` at every step, so a re-plan reshapes the rest of the
    schedule. (A plain function: LambdaLR keeps it out of its state dict.)"""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, state.total, warmup_ratio))


# -- time budget ----------------------------------------------------------------------------------
def planned_total(total: int, step: int, per_step_s: float, left_s: float) -> int:
    """Steps that fit warmup + cosine into the time left (3% kept for the final save), at most `total`."""
    return min(total, step + max(0, int(0.97 * left_s / per_step_s)))


def replan_due(steps_here: int) -> bool:
    """Whether this run's `steps_here`-th step (1-based) re-plans: the 11th, then every 50th (61st, 111th, ...)."""
    return steps_here > PROBE_STEPS and (steps_here - 1) % REPLAN_EVERY == PROBE_STEPS % REPLAN_EVERY


def broadcast_int(value: int, dev, world: int) -> int:
    """Rank 0's `value` on every rank (world 1: `value`)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], device=dev)
    dist.broadcast(t, 0)
    return int(t)


@dataclass
class TimeBudget:
    """Fits the schedule into `budget_s` of wall time over all runs of a training (`state.elapsed_s` holds the
    earlier runs'). Steps are timed from the end of this run's first step (which pays one-off costs), so a resumed
    run measures its own speed; a shared machine's speed changes under us, hence the periodic re-plan."""

    budget_s: float
    nominal_total: int  # the --steps/--epochs total: a plan never exceeds it
    t_start: float  # this run's start (time.perf_counter)
    steps_here: int = 0
    t_probe: float = field(default=0.0)

    def step_done(self, state: TrainState, now: float, dev=None, world: int = 1) -> bool:
        """Count a finished step at time `now`; when due, re-plan `state.total` (rank 0's plan on every rank, so all
        stop at the same step). Returns whether it re-planned."""
        self.steps_here += 1
        if self.steps_here == 1:
            self.t_probe = now
            return False
        if not replan_due(self.steps_here):
            return False
        left = self.budget_s - state.elapsed_s - (now - self.t_start)
        per_step = (now - self.t_probe) / (self.steps_here - 1)
        state.total = broadcast_int(planned_total(self.nominal_total, state.step, per_step, left), dev, world)
        state.planned = True
        return True


# -- data order -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def epoch_order(n_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The sample order of `epoch`: a function of (seed, epoch) only, so every rank and a resumed run agree."""
    perm = list(range(n_samples))
    random.Random(seed * 1000003 + epoch).shuffle(perm)
    return tuple(perm)


def rank_batch(state: TrainState, n_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """This rank's sample indices for the next step: a disjoint `rank::world` shard of the batch at `state.pos` in
    the epoch's order. Moves `state` to the next epoch first when the current one has no full batch left; the
    caller advances `state.pos` after the step."""
    if state.pos + batch_size > n_samples:
        state.epoch, state.pos = state.epoch + 1, 0
    batch = epoch_order(n_samples, seed, state.epoch)[state.pos : state.pos + batch_size]
    return list(batch[rank::world])


# -- checkpoint -----------------------------------------------------------------------------------
def save_checkpoint(path: Path, *, draft, scale, opt, sched, state: TrainState, cfg: dict) -> None:
    """Write the resumable state to `path` atomically (a kill mid-write leaves the previous checkpoint).
    Keys: draft, scale, opt, sched, state, torch_rng, py_rng, cfg, config (the draft's config, for
    `draft_from_checkpoint`)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "draft": draft.state_dict(),
            "scale": scale.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "state": state.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
            "cfg": cfg,
            "config": draft.config.to_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def restore_checkpoint(path: Path, *, draft, scale, opt, sched, state: TrainState, dev) -> None:
    """Load a `save_checkpoint` file into the given objects and `state` (in place), and restore the torch and
    Python RNGs. Raises whatever `torch.load` / `load_state_dict` raise on a corrupt or mismatched file."""
    blob = torch.load(path, map_location=dev, weights_only=False)  # our own file (python RNG state, cfg dict)
    draft.load_state_dict(blob["draft"])
    scale.load_state_dict(blob["scale"])
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    state.load_dict(blob["state"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["py_rng"])


class StopOnSignal:
    """Context manager: while active (and `enabled`), SIGINT/SIGTERM set `requested` instead of killing the
    process, so the loop ends at a step boundary and saves; the previous handlers come back on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self._old = enabled, False, {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# -- log ------------------------------------------------------------------------------------------
class LogWindow:
    """Sums of the steps since the last `log.jsonl` row."""

    def __init__(self, n_offsets: int, t0: float):
        self.t0, self.steps, self.loss, self.labels = t0, 0, 0.0, 0
        self.acc, self.agree = torch.zeros(n_offsets), torch.zeros(n_offsets)

    def add(self, loss: float, acc: torch.Tensor, agree: torch.Tensor, n: torch.Tensor) -> None:
        """One step's loss, per-offset accuracy and teacher agreement [K], per-offset label counts [K]."""
        self.steps += 1
        self.loss += loss
        self.acc += acc.cpu()
        self.agree += agree.cpu()
        self.labels += int(n.sum())

    def row(self, state: TrainState, *, lr: float, grad_norm: float, world: int, now: float, t_start: float) -> dict:
        """The log row: means over the window, this rank's labels/s times `world`, and the training's wall time
        (`t_start`: this run's start)."""
        return {
            "step": state.step,
            "epoch": state.epoch,
            "loss": self.loss / self.steps,
            "acc": [round(float(a), 4) for a in self.acc / self.steps],
            "agree": [round(float(a), 4) for a in self.agree / self.steps],
            "labels_seen": state.labels_seen,
            "lr": lr,
            "grad_norm": grad_norm,
            "labels_per_s": self.labels * world / max(now - self.t0, 1e-9),
            "elapsed_s": state.elapsed_s + (now - t_start),
        }


# -- distributed ----------------------------------------------------------------------------------
def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
