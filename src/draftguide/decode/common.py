"""What the decoders share: generation stats, the clock, prompt checks, stop tokens and KV-cache helpers, and
the steps that speculative decoding (`speculative.py`) and exact speculative guided decoding (`guided.py`) both
take: prefill, a draft block from cached context, a target forward over a block, greedy acceptance, commit.

A speculative step at `start` (the anchor: committed, not yet read by the target) runs
    draft_block -> proposals -> verify_block -> accept (`accepted_length`, or rejection sampling) -> commit
and then crops the target cache to the committed length."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, DraftCache, context_end
from draftguide.modeling.targets import extract_features


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


# -- steps of a speculative loop ------------------------------------------------------------------------
def token_buffer(input_ids: torch.Tensor, max_new_tokens: int, block_size: int, fill: int) -> torch.Tensor:
    """[1, T0 + max_new_tokens + block_size]: the prompt, then `fill` (the mask token), so that the block at any
    anchor before the end fits and reads as `[anchor, MASK...]`. # input_ids: [1, T0]"""
    T0 = input_ids.shape[1]
    buf = torch.full((1, T0 + max_new_tokens + block_size), fill, dtype=torch.long, device=input_ids.device)
    buf[:, :T0] = input_ids
    return buf


def prefill(target, input_ids: torch.Tensor, cache, layer_ids: list[int]):
    """The target's forward over the prompt into `cache`. Returns its next-token logits [1, V], the draft's
    features of the prompt [1, T0, n*d] (layers `layer_ids`) and the model output. # input_ids: [1, T0]"""
    out = target(input_ids, **{cache_kwarg(target): cache}, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    return out.logits[:, -1], extract_features(out.hidden_states, layer_ids), out


def draft_block(
    target, draft: DFlashDraft, cache: DraftCache, ctx: torch.Tensor, block: torch.Tensor, start: int, rows: slice
) -> torch.Tensor:
    """Draft states at block offsets `rows` of `block` (tokens at positions start..start+L-1), reading the cached
    context plus `ctx`, the features of positions len(cache)..end-1 with end = `context_end(start)`; appends
    `ctx` to the cache. Block offset k predicts the token at start + k.
    # ctx: [1, C, n*d], block: [1, L] = [anchor, ...] -> [1, n, d]"""
    end = context_end(start, draft.context_includes_anchor)
    dev, C, L = block.device, ctx.shape[1], block.shape[1]
    pos = torch.cat([torch.arange(end - C, end, device=dev), torch.arange(start, start + L, device=dev)])[None]
    return draft(draft.embed(target, block), ctx, pos, cache=cache, rows=rows)


def verify_block(model, block: torch.Tensor, start: int, cache, cache_key: str):
    """One target forward over `block` at positions start..start+n-1, appended to `cache`, hidden states kept
    (the features of the next context). `cache_key`: `cache_kwarg(model)`. # block: [1, n] -> the model output"""
    pos = torch.arange(start, start + block.shape[1], device=block.device)[None]
    return model(block, position_ids=pos, **{cache_key: cache}, use_cache=True, output_hidden_states=True)


def accepted_length(proposed: torch.Tensor, chosen: torch.Tensor) -> int:
    """Greedy acceptance: how many leading proposals equal the verifier's choice at their position (one sync).
    # proposed: [n]; chosen: [n + 1], the choice after the anchor and after each proposal"""
    return int((proposed == chosen[:-1]).cumprod(0).sum())


def commit(
    buf: torch.Tensor, start: int, proposed: torch.Tensor, n_accepted: int, next_token: torch.Tensor, max_len: int
) -> int:
    """Write the accepted proposals and then the verifier's own next token after the anchor at `start`. Returns
    how many of those tokens count: n_accepted + 1, fewer where they pass `max_len`.
    # buf: [1, max_len + B], proposed: [>= n_accepted], next_token: a 0-d tensor"""
    buf[0, start + 1 : start + n_accepted + 1] = proposed[:n_accepted]
    buf[0, start + n_accepted + 1] = next_token
    return min(n_accepted + 1, max_len - start - 1)


def read_committed(buf: torch.Tensor, first: int, n: int, stop: set[int]) -> tuple[list[int], bool]:
    """The tokens buf[0, first : first + n] (one sync), cut just after the first stop token, and whether one
    was hit."""
    tokens = buf[0, first : first + n].tolist()
    hit = first_stop(tokens, stop) if stop else None
    return (tokens, False) if hit is None else (tokens[: hit + 1], True)


__all__ = [
    "GenStats",
    "accepted_length",
    "cache_kwarg",
    "check_prompt",
    "commit",
    "crop_cache",
    "draft_block",
    "first_stop",
    "now",
    "prefill",
    "read_committed",
    "token_buffer",
    "verify_block",
]
