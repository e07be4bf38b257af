"""Token sampling and the speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023)."""

from __future__ import annotations

import torch

from .errors import DraftGuideError


def check_sampling(temperature: float, top_p: float = 1.0, top_k: int = 0) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise DraftGuideError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise DraftGuideError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise DraftGuideError(f"top_k must be >= 0, got {top_k}")


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and nucleus filtering. [..., V] -> [..., V] (fp32)."""
    scores = logits.float() / temperature
    V = scores.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # keep the smallest prefix reaching mass top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    # [..., V] -> [...]
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None) -> torch.Tensor:
    """Greedy at temperature 0, else a draw from `probs_from_logits`. [..., V] -> [...]"""
    if temperature == 0:
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
