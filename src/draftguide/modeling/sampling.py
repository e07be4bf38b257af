"""Token sampling and the speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023)."""

from __future__ import annotations

import math

import torch

from draftguide.errors import DraftGuideError

# Temperatures below this decode greedily, as in vLLM (`_SAMPLING_EPS`): dividing logits by 1e-40 overflows to
# inf and softmax to NaN, while the limit T -> 0 of sampling is the argmax anyway.
GREEDY_BELOW = 1e-5


def check_sampling(temperature: float, top_p: float = 1.0, top_k: int = 0) -> None:
    """The sampling parameters every entry point (library, CLI, server) accepts, as the OpenAI API and vLLM
    do: temperature any finite number >= 0 (below `GREEDY_BELOW`: greedy; no upper cap, large values approach
    uniform), top_p in [0, 1] (0 keeps only the most likely token), top_k an integer >= -1 (0 or -1: no limit;
    larger than the vocabulary: no limit). NaN, infinities, booleans and other types are refused."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DraftGuideError(f"{name} must be a finite number, got {v!r}")
    if temperature < 0:
        raise DraftGuideError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise DraftGuideError(f"top_p must be in [0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise DraftGuideError(f"top_k must be an integer >= 0 (0 or -1: no limit), got {top_k!r}")


SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def resolve_seed(seed: int | None) -> int:
    """The seed a call uses: `seed` itself (checked), or fresh randomness when None, so unseeded calls do
    not repeat each other; record the value returned to reproduce the call."""
    if seed is None:
        import secrets

        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise DraftGuideError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return seed


def effective_temperature(temperature: float) -> float:
    """0.0 (greedy) for temperatures below `GREEDY_BELOW`, else the temperature itself."""
    return 0.0 if temperature < GREEDY_BELOW else float(temperature)


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and nucleus filtering. [..., V] -> [..., V] (fp32).
    A temperature below `GREEDY_BELOW` gives the one-hot argmax; top_p keeps at least the most likely token."""
    if temperature < GREEDY_BELOW:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scores = logits.float() / temperature
    V = scores.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # keep the smallest prefix reaching mass top_p
        keep[..., 0] = True  # and at least the most likely token (top_p = 0 is greedy, as in the OpenAI API)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    # [..., V] -> [...]
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None) -> torch.Tensor:
    """Greedy at temperature 0 (below `GREEDY_BELOW`), else a draw from `probs_from_logits`. [..., V] -> [...]"""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    return sample_probs(probs_from_logits(logits, temperature, top_p, top_k), generator)


def rejection_sample(
    draft_tokens: torch.Tensor,  # [n] proposed tokens
    p: torch.Tensor,  # [n + 1, V] target probabilities at the proposal positions and one past them
    q: torch.Tensor,  # [n, V] draft probabilities the proposals were drawn from
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    """Accept proposal i with prob min(1, p_i/q_i) while all earlier ones were accepted; at the first
    rejection draw from normalize(max(p - q, 0)); if all are accepted draw the bonus from p[n].
    The committed tokens are then distributed exactly as the target's own samples.
    Returns (number accepted, next token)."""
    n = draft_tokens.shape[0]
    idx = draft_tokens[:, None]
    p_tok, q_tok = p[:n].gather(-1, idx)[:, 0], q.gather(-1, idx)[:, 0]
    u = torch.rand(n, generator=generator, device=p.device)
    ok = (u * q_tok < p_tok).int()  # u < p/q without dividing by a zero q
    accepted = int(ok.cumprod(0).sum())
    if accepted == n:
        return n, sample_probs(p[n], generator)
    residual = (p[accepted] - q[accepted]).clamp_min(0)
    total = residual.sum()
    dist = residual / total if total > 0 else p[accepted]  # p == q exactly: any rejection is measure-zero
    return accepted, sample_probs(dist, generator)
