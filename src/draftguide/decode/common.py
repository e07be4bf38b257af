"""What the decoders share: generation stats, the clock, prompt checks, stop tokens and KV-cache helpers."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from draftguide.errors import DraftGuideError


@dataclass
class GenStats:
    num_input_tokens: int
    num_new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    acceptance_lengths: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify step (bonus included)."""
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else float("nan")

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def now(device) -> float:
    """Wall-clock seconds once the device's queued work is done (a CUDA sync; a plain clock elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_prompt(input_ids: torch.Tensor, max_new_tokens: int, target=None) -> None:
    """Raise a one-line DraftGuideError unless `input_ids` is one non-empty prompt [1, T], `max_new_tokens` >= 1
    and (given a target) the prompt plus the budget fit its context."""
    from draftguide.modeling.prompts import check_length

    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise DraftGuideError(f"input_ids must have shape [1, T] (batch size 1), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise DraftGuideError("empty prompt: input_ids has no tokens")
    if max_new_tokens < 1:
        raise DraftGuideError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if target is not None:
        check_length(target, input_ids.shape[1], max_new_tokens)


def first_stop(tokens: list[int], stop: set[int]) -> int | None:
    """Index of the first stop token in `tokens`, or None."""
    return next((i for i, t in enumerate(tokens) if t in stop), None)


def crop_cache(cache, length: int) -> None:
    """Keep the first `length` positions (transformers 5.x `crop` takes minus the number to drop)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.24); use whichever this model takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


__all__ = ["GenStats", "cache_kwarg", "check_prompt", "crop_cache", "first_stop", "now"]
