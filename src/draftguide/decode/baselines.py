"""Decoding baselines for draft-guided decoding, all with a target KV cache: temperature sampling, Power
Sampling and DoLa.

- Power Sampling (Karan & Du 2025, arXiv 2510.14901): Metropolis-Hastings over whole continuations
  targeting p(x)^alpha, grown block by block.
- DoLa (Chuang et al. 2023): contrast the final layer's log-probs with a premature layer picked per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from draftguide.decode.common import GenStats, cache_kwarg, check_prompt, crop_cache, now
from draftguide.decode.guided import js_divergence
from draftguide.decode.speculative import autoregressive
from draftguide.errors import DraftGuideError


# -- temperature sampling ----------------------------------------------------------------------------
@torch.inference_mode()
def sample_generate(
    target,
    input_ids: torch.Tensor,  # [1, T]
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int,
    stop_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, GenStats]:
    """Plain autoregressive sampling with a KV cache (temperature 0: greedy)."""
    from draftguide.modeling.sampling import check_sampling, sample

    check_sampling(temperature, top_p, top_k)
    check_prompt(input_ids, max_new_tokens, target)
    pick = lambda out: sample(out.logits[:, -1], temperature, top_p, top_k, generator)[:, None]  # noqa: E731
    return autoregressive(target, input_ids, max_new_tokens, stop_token_ids, pick)


# -- Power Sampling ----------------------------------------------------------------------------------
# The reference's settings (Karan & Du 2025, `mcmc_power_samp`): max_new_tokens split into block_num = 16
# blocks, mcmc_steps = 10 MH steps after each, alpha = 4 (proposal at temperature 1/alpha). "cpu" is a
# cheaper preset for this machine (about 3.5 tokens generated per output token instead of about 43).
POWER_PRESETS = {
    "paper": {"alpha": 4.0, "block_num": 16, "mcmc_steps": 10},
    "cpu": {"alpha": 4.0, "block_num": 4, "mcmc_steps": 2},
}


@dataclass
class PowerStats(GenStats):
    alpha: float = 4.0
    block_num: int = 16
    mcmc_steps: int = 10
    sampled_tokens: int = 0  # every token drawn: the initial growth plus all MH proposals
    proposals: int = 0
    accepted: int = 0

    @property
    def tokens_per_output_token(self) -> float:
        """The method's cost: tokens generated per token of output (plain decoding: 1)."""
        return self.sampled_tokens / max(self.num_new_tokens, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposals if self.proposals else float("nan")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p (the model, temperature 1) and log q (the proposal, temperature 1/alpha) of `tokens`.
    # logits: [N, V], tokens: [N] -> ([N], [N])"""
    lf = logits.float()
    idx = tokens[:, None]
    return torch.log_softmax(lf, -1).gather(-1, idx)[:, 0], torch.log_softmax(alpha * lf, -1).gather(-1, idx)[:, 0]


def mh_log_ratio(alpha: float, i: int, lp_new, lq_new, lp_old, lq_old) -> float:
    """log of the MH acceptance ratio for replacing the suffix from offset i of a continuation of length
    L = i + len(old) by one of length L' = i + len(new), target pi = p^alpha, the move being: pick i
    uniformly among the L offsets, then draw from the proposal q until a stop token or the length limit:

        log [pi(x') (1/L') q(old | prefix)] / [pi(x) (1/L) q(new | prefix)]

    (the shared prefix cancels). Each of lp_*/lq_* holds the per-token log p / log q of a suffix; the
    reverse move exists because both suffixes are complete proposals (each ends at a stop or the limit)."""
    L, L_new = i + len(lp_old), i + len(lp_new)
    return float(alpha * (lp_new.sum() - lp_old.sum()) + (lq_old.sum() - lq_new.sum())) + math.log(L / L_new)


class _Chain:
    """The current continuation with per-token log p / log q, and a target cache valid for `valid` positions
    of it (a rejected proposal leaves stale entries behind `valid`). A stop token can only be its last token."""

    def __init__(self, target, input_ids: torch.Tensor, alpha: float, stop: set[int], generator):
        self.target, self.alpha, self.stop, self.gen = target, alpha, stop, generator
        self.ids = input_ids  # [1, T0 + L]
        self.T0 = input_ids.shape[1]
        self.lp = self.lq = torch.zeros(0, device=input_ids.device)
        self.cache, self.ck, self.valid = DynamicCache(config=target.config), cache_kwarg(target), 0
        self.sampled = 0

    @property
    def length(self) -> int:
        return self.ids.shape[1] - self.T0

    def ended(self) -> bool:
        return self.length > 0 and int(self.ids[0, -1]) in self.stop

    def propose(self, a: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to n tokens at positions a.. drawn from the proposal after ids[:, :a] (stopping at a stop
        token). Returns (tokens [k], log p [k], log q [k]); the cache then holds ids[:a] + tokens[:-1]."""
        keep = min(self.valid, a - 1)  # re-read at least the last prefix token to get its logits
        crop_cache(self.cache, keep)
        feed, toks, lps, lqs = self.ids[:, keep:a], [], [], []
        for _ in range(n):
            start = self.cache.get_seq_length()
            pos = torch.arange(start, start + feed.shape[1], device=feed.device)[None]
            logits = self.target(
                feed, position_ids=pos, **{self.ck: self.cache}, use_cache=True, logits_to_keep=1
            ).logits[:, -1]
            tok = torch.multinomial(torch.softmax(self.alpha * logits.float(), -1), 1, generator=self.gen)[0]  # [1]
            lp, lq = token_logprobs(logits, tok, self.alpha)
            toks.append(tok), lps.append(lp), lqs.append(lq)
            feed = tok[None]
            if int(tok) in self.stop:
                break
        self.valid = a + len(toks) - 1
        self.sampled += len(toks)
        return torch.cat(toks), torch.cat(lps), torch.cat(lqs)

    def set_suffix(self, i: int, toks, lp, lq) -> None:
        """Replace the continuation from offset i on."""
        self.ids = torch.cat([self.ids[:, : self.T0 + i], toks[None]], 1)
        self.lp, self.lq = torch.cat([self.lp[:i], lp]), torch.cat([self.lq[:i], lq])

    def grow(self, limit: int) -> None:
        """Extend the continuation from the proposal up to `limit` tokens (or a stop token)."""
        if not self.ended() and self.length < limit:
            self.set_suffix(self.length, *self.propose(self.ids.shape[1], limit - self.length))

    def mh_step(self, rng: torch.Generator, limit: int) -> bool:
        """One MH step targeting p^alpha over continuations of at most `limit` tokens (those that end at a
        stop token, or reach the limit): resample the suffix from a uniformly chosen offset i with the
        proposal, until a stop token or the limit (a stopped continuation can grow back), and accept with
        `mh_log_ratio` (which includes the 1/L vs 1/L' of choosing i)."""
        L = self.length
        i = int(torch.randint(0, L, (1,), generator=rng))
        toks, lp, lq = self.propose(self.T0 + i, limit - i)
        log_r = mh_log_ratio(self.alpha, i, lp, lq, self.lp[i:], self.lq[i:])
        if math.log(float(torch.rand(1, generator=rng)) + 1e-300) < log_r:
            self.set_suffix(i, toks, lp, lq)
            return True
        self.valid = self.T0 + i  # past T0 + i the cache holds the rejected proposal
        return False


def block_ends(max_new_tokens: int, block_num: int) -> list[int]:
    """Continuation length at the end of each block: max_new_tokens split into block_num blocks (as evenly
    as possible when it does not divide; the reference requires it to; at most one block per token)."""
    n = min(block_num, max_new_tokens)
    return [(k + 1) * max_new_tokens // n for k in range(n)]


@torch.inference_mode()
def power_sample(
    target,
    input_ids: torch.Tensor,  # [1, T]
    *,
    alpha: float = POWER_PRESETS["paper"]["alpha"],
    mcmc_steps: int = POWER_PRESETS["paper"]["mcmc_steps"],
    block_num: int = POWER_PRESETS["paper"]["block_num"],
    max_new_tokens: int,
    stop_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, PowerStats]:
    """Sample (approximately) from p(x)^alpha / Z over continuations, as the reference `mcmc_power_samp`:
    `max_new_tokens` is split into `block_num` blocks; each block grows the continuation from the proposal
    (the model at temperature 1/alpha), then `mcmc_steps` Metropolis-Hastings steps run over the whole
    continuation so far (`_Chain.mh_step`: a uniformly chosen suffix resampled up to the current block's
    length limit or a stop token, accepted with `mh_log_ratio`; each step leaves p^alpha restricted to
    continuations within the limit invariant). Stops after the block in which the continuation ends with a
    stop token. Defaults: the reference's (`POWER_PRESETS["paper"]`). `generator` seeds both the proposals
    and the MH choices. Returns `(tokens [1, T + n], stats)`; `stats.tokens_per_output_token` is its cost."""
    check_prompt(input_ids, max_new_tokens, target)
    if not alpha >= 1:
        raise DraftGuideError(f"alpha must be >= 1 (p^alpha sharpens the model), got {alpha}")
    if mcmc_steps < 0 or block_num < 1:
        raise DraftGuideError(f"need mcmc_steps >= 0 and block_num >= 1, got {mcmc_steps} and {block_num}")
    gen = generator or torch.Generator(device=input_ids.device).manual_seed(0)
    rng = torch.Generator().manual_seed(int(gen.initial_seed()) + 1)  # the MH choices, on the CPU
    chain = _Chain(target, input_ids, float(alpha), set(stop_token_ids or ()), gen)
    stats = PowerStats(
        num_input_tokens=input_ids.shape[1], alpha=float(alpha), block_num=block_num, mcmc_steps=mcmc_steps
    )
    t0 = now(input_ids.device)
    for limit in tqdm(block_ends(max_new_tokens, block_num), desc="power", disable=not progress):
        chain.grow(limit)
        for _ in range(mcmc_steps):
            stats.accepted += chain.mh_step(rng, limit)
            stats.proposals += 1
        if chain.ended():
            break
    stats.decode_s = now(input_ids.device) - t0
    stats.num_new_tokens, stats.sampled_tokens = chain.length, chain.sampled
    return chain.ids, stats


# -- DoLa ----------------------------------------------------------------------------------------------
@dataclass
class DolaStats(GenStats):
    premature_layers: list[int] | None = None  # the layer contrasted at each step


def default_candidate_layers(target) -> list[int]:
    """DoLa's `low` bucket as in transformers: every other layer of the lower half, skipping the embedding
    output (hidden state 0) when the embeddings are tied, where reading it through lm_head is ~ identity."""
    L = target.config.get_text_config().num_hidden_layers
    tied = getattr(target.config.get_text_config(), "tie_word_embeddings", False)
    start = 0 if not tied else min(2, L // 2)
    return list(range(start, L // 2, 2)) or [start]


def relative_top_mask(logprobs: torch.Tensor, relative_top: float) -> torch.Tensor:
    """True where a token is implausible: p < relative_top * max p (the top token always stays). [..., V]"""
    thresh = logprobs.max(-1, keepdim=True).values + math.log(relative_top)
    return logprobs < thresh


def dola_scores(hidden_states, final_logits: torch.Tensor, head, norm, candidates: list[int], relative_top: float):
    """Contrast scores for the last position and the chosen premature layer per row.

    Intermediate states go through the model's *final norm* before `lm_head` (as in the DoLa code; the
    transformers implementation skips the norm). Candidate L (the last layer) means the final logits
    themselves: the contrast is then zero and the score falls back to the final log-probs (plain greedy).
    # hidden_states: L+1 tensors [B, T, d] (index i = after layer i, 0 = embeddings); final_logits: [B, V]
    -> scores [B, V], premature layer [B]"""
    L = len(hidden_states) - 1
    final = torch.log_softmax(final_logits.float(), -1)  # [B, V]
    prem = torch.stack(
        [final_logits.float() if j == L else head(norm(hidden_states[j][:, -1])).float() for j in candidates]
    )  # [C, B, V]
    js = js_divergence(final[None].expand_as(prem), prem)  # [C, B]
    best = js.argmax(0)  # [B]
    base = torch.log_softmax(prem.gather(0, best[None, :, None].expand(1, *final.shape))[0], -1)
    is_final = (torch.tensor(candidates, device=best.device)[best] == L)[:, None]
    scores = torch.where(is_final, final, final - base)
    return scores.masked_fill(relative_top_mask(final, relative_top), float("-inf")), torch.tensor(candidates)[
        best.cpu()
    ]


@torch.inference_mode()
def dola_generate(
    target,
    input_ids: torch.Tensor,  # [1, T]
    *,
    candidate_layers: list[int] | None = None,
    relative_top: float = 0.1,
    max_new_tokens: int,
    stop_token_ids: list[int] | None = None,
) -> tuple[torch.Tensor, DolaStats]:
    """DoLa greedy decoding: each token maximises log q_final - log q_M over the relative-top set, where the
    premature layer M (hidden-state index: 0 = embeddings, i = after decoder layer i, L = final) is the
    candidate with the largest Jensen-Shannon divergence from the final distribution at this token. Final
    norm applied to intermediate states before lm_head. No repetition penalty (the paper adds 1.2)."""
    check_prompt(input_ids, max_new_tokens, target)
    L = target.config.get_text_config().num_hidden_layers
    cands = list(candidate_layers) if candidate_layers else default_candidate_layers(target)
    if any(not 0 <= j <= L for j in cands):
        raise DraftGuideError(f"DoLa candidate layers must be in [0, {L}] (hidden-state indices), got {cands}")
    if not 0 < relative_top < 1:
        raise DraftGuideError(f"relative_top must be in (0, 1), got {relative_top}")
    norm = getattr(target.get_decoder(), "norm", None)
    if norm is None:
        raise DraftGuideError("DoLa needs the target's final norm (model.norm); this architecture has none")
    head = target.get_output_embeddings()
    stats = DolaStats(num_input_tokens=input_ids.shape[1], premature_layers=[])

    def pick(out) -> torch.Tensor:
        scores, layer = dola_scores(out.hidden_states, out.logits[:, -1], head, norm, cands, relative_top)
        stats.premature_layers.append(int(layer[0]))
        return scores.argmax(-1, keepdim=True)  # [1, 1]

    return autoregressive(target, input_ids, max_new_tokens, stop_token_ids, pick, stats, hidden=True)


__all__ = [
    "POWER_PRESETS",
    "PowerStats",
    "DolaStats",
    "block_ends",
    "dola_generate",
    "dola_scores",
    "mh_log_ratio",
    "power_sample",
    "sample_generate",
    "token_logprobs",
]
