"""Draft-guided decoding: decode from a mix of the target's next-token logits and the draft's k=1 readout.

Each step the target scores the next token and the draft reads the target's intermediate layers from the
latest anchor (the last committed token; block position 1 predicts the next token, as in speculation):

    guided = (1 - beta) * target + beta * draft                      (mix="logits", the seed's formula)
    guided = log((1 - beta) * softmax(target) + beta * softmax(draft))   (mix="probs", a mixture of distributions)

(Mixing log-softmaxes, the former mix="logprobs", only subtracts a per-row constant from mix="logits": it
decoded exactly the same and is refused.) mix="logits" is a product of experts (p_t^(1-beta) p_d^beta,
renormalised: a token needs both models' support); mix="probs" is a mixture (a token either model likes
keeps that model's share of the mass).

beta=0 is the target's own decoding, beta=1 decoding from the draft's k=1 readout alone. Both models keep
KV caches: the target a `DynamicCache`, the draft a `DraftCache` of context K/V, so the draft never
re-reads the context. The draft always fills a full block (`[anchor, MASK x (B-1)]`): attention inside a
block is bidirectional, so a shorter block would change the k=1 readout.

`speculative=True` (greedy only) gives the same tokens faster: the draft proposes a block, the target
verifies `verify_len` of its tokens in one forward, one multi-anchor draft pass over the verified positions
gives the k=1 readout at every block position, and the longest prefix equal to the guided argmax is
committed, plus the guided argmax at the first mismatch. Where the draft adds no output scaling of its own,
one head call gives both models' logits for the step (on a CPU each call reads the whole vocabulary
matrix). The draft's last layer computes only the block offsets that are read (`DFlashDraft.forward(rows=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from draftguide.decode.common import (
    GenStats,
    accepted_length,
    cache_kwarg,
    check_prompt,
    commit,
    crop_cache,
    draft_block,
    now,
    prefill,
    read_committed,
    token_buffer,
    verify_block,
)
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import BlockMask, DraftCache, block_inputs, context_end, context_visible
from draftguide.modeling.sampling import check_sampling, effective_temperature, sample
from draftguide.modeling.targets import extract_features

MIXES = ("logits", "probs")
REMOVED_MIXES = {
    "logprobs": "mix 'logprobs' was removed: mixing log-softmaxes only subtracts a per-row constant, so it "
    "decoded exactly like mix 'logits'; use mix 'probs' for the probability mixture "
    "(1-beta) p_target + beta p_draft"
}
SCHEDULES = ("fixed", "adaptive")
GUIDED_CONTROLS = ("noise", "shuffle")  # null controls of guided decoding (not the diagnostic's CONTROLS)


@dataclass
class Flip:
    """A new token whose guided argmax differs from the target's argmax."""

    index: int  # offset among the new tokens
    target_token: int
    guided_token: int


@dataclass
class GuidedStats(GenStats):
    beta: float = 0.0
    flips: list[Flip] = field(default_factory=list)
    mean_beta: float = float("nan")  # mean effective beta per token (differs from beta when adaptive)

    @property
    def tokens(self) -> int:
        return self.num_new_tokens

    @property
    def seconds(self) -> float:
        return self.total_s


# -- the mix -----------------------------------------------------------------------------------------
def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between softmax(a) and softmax(b). [..., V] -> [...]"""
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    lm = torch.logaddexp(la, lb) - math.log(2.0)
    kl = lambda lp: (lp.exp() * (lp - lm)).nan_to_num().sum(-1)  # noqa: E731  (0 * -inf terms are 0)
    return 0.5 * (kl(la) + kl(lb))


def noise_logits(draft_logits: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """The null control: Gaussian logits with each position's draft mean and std. The draw depends only on
    (seed, absolute position), so token-by-token and speculative decoding see the same noise.
    # draft_logits: [N, V], positions: [N] -> [N, V]"""
    d = draft_logits.float()
    V = d.shape[-1]
    z = torch.stack(
        [
            torch.randn(V, generator=torch.Generator().manual_seed((seed * 1_000_003 + int(p)) % 2**64))
            for p in positions.tolist()
        ]
    )
    return d.mean(-1, keepdim=True) + d.std(-1, keepdim=True) * z.to(d.device)


def guide(
    target_logits: torch.Tensor,  # [N, V]
    draft_logits: torch.Tensor,  # [N, V]
    beta: float,
    *,
    mix: str = "logits",
    beta_schedule: str = "fixed",
    guard_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided logits [N, V] and the effective beta per row [N].

    `beta_schedule="adaptive"`: beta_t = beta * JS(target_t, draft_t) / ln 2, i.e. full guidance where the
    two distributions are disjoint and none where they agree (where guidance would change little anyway).
    `guard_top_k=k`: guidance may only re-rank the target's top-k tokens (a fluency guard).
    `mix="logits"` mixes the logits; `mix="probs"` returns log((1-b) p_target + b p_draft) (log-probabilities,
    so softmax of the result is the mixture itself)."""
    t = target_logits.float()
    betas = torch.full(t.shape[:-1], float(beta), device=t.device)
    if beta == 0:
        out = t  # exactly the target, whatever the draft says
    else:
        if beta_schedule == "adaptive":
            betas = beta * js_divergence(t, draft_logits) / math.log(2.0)
        d = draft_logits.float()
        b = betas[..., None]
        if mix == "probs":  # log of the mixture, in log space (a zero weight gives log 0 = -inf: that side drops out)
            out = torch.logaddexp(torch.log1p(-b) + torch.log_softmax(t, -1), torch.log(b) + torch.log_softmax(d, -1))
        elif mix == "logits":
            out = (1 - b) * t + b * d
        else:
            raise DraftGuideError(REMOVED_MIXES.get(mix) or f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if guard_top_k:
        kth = torch.topk(target_logits, min(guard_top_k, t.shape[-1]), -1).values[..., -1:]
        out = out.masked_fill(target_logits < kth, float("-inf"))
    return out, betas


def check_guided(beta: float, beta_schedule: str, mix: str, guard_top_k, control) -> None:
    if not 0 <= beta <= 1:  # also rejects NaN
        raise DraftGuideError(f"beta must be in [0, 1], got {beta}")
    if beta_schedule not in SCHEDULES:
        raise DraftGuideError(f"beta_schedule must be one of {', '.join(SCHEDULES)}, got {beta_schedule!r}")
    if mix in REMOVED_MIXES:
        raise DraftGuideError(REMOVED_MIXES[mix])
    if mix not in MIXES:
        raise DraftGuideError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if guard_top_k is not None and guard_top_k < 1:
        raise DraftGuideError(f"guard_top_k must be >= 1, got {guard_top_k}")
    if control is not None and control not in GUIDED_CONTROLS:
        raise DraftGuideError(f"control must be None or one of {', '.join(GUIDED_CONTROLS)}, got {control!r}")


# -- decoding -------------------------------------------------------------------------------------------
@dataclass
class GuidedSetup:
    """What every step needs besides the caches: the mix and its options."""

    target: object
    draft: object
    beta: float
    mix: str
    beta_schedule: str
    guard_top_k: int | None
    control: str | None
    seed: int
    donor_logits: torch.Tensor | None = None  # [A, V]: control "shuffle"
    first: int = 0  # absolute position of the first new token

    def mixed(self, t_logits: torch.Tensor, d_logits: torch.Tensor, positions: torch.Tensor):
        # t/d_logits: [N, V] for absolute token positions [N] -> guided [N, V], betas [N]
        if self.control == "noise":
            d_logits = noise_logits(d_logits, positions, self.seed)
        elif self.control == "shuffle":  # new token i gets the donor's readout at its own step i (cycled)
            idx = (positions - self.first) % self.donor_logits.shape[0]
            d_logits = self.donor_logits[idx.to(self.donor_logits.device)].to(t_logits.device)
        return guide(
            t_logits, d_logits, self.beta, mix=self.mix, beta_schedule=self.beta_schedule, guard_top_k=self.guard_top_k
        )


def _draft_block(
    s: GuidedSetup, dcache: DraftCache, ctx: torch.Tensor, anchor: torch.Tensor, start: int, n: int = 1
) -> torch.Tensor:
    """Draft states [1, n, d] of block positions 1..n of the full block `[anchor, MASK x (B-1)]` at `start`
    (attention inside a block is bidirectional: a shorter block would change the readout), from cached context
    plus `ctx` (positions len(dcache)..context_end(start)-1); block position k predicts token start + k.
    # ctx: [1, C, n*d], anchor: [1, 1]"""
    d = s.draft
    block = torch.full((1, d.block_size), d.mask_token_id, dtype=torch.long, device=anchor.device)
    block[:, :1] = anchor
    return draft_block(s.target, d, dcache, ctx, block, start, rows=slice(1, n + 1))


def _draft_k1(s: GuidedSetup, dcache: DraftCache, ctx: torch.Tensor, anchor: torch.Tensor, start: int, n: int = 1):
    """Logits [n, V] of block positions 1..n of `_draft_block`."""
    return s.draft.logits(_draft_block(s, dcache, ctx, anchor, start, n), s.target)[0]


def shared_head(s: GuidedSetup, out) -> torch.nn.Module | None:
    """The target's output head when one call of it can give both next-token logits: the target's logits are
    exactly head(final state) and the draft adds no scaling of its own. On a CPU a batch-1 step reads the whole
    vocabulary matrix per call, so sharing the call saves much of guidance's cost. Not at beta 0, which must
    stay bit-identical to the target's own greedy decoding.
    # out: the prefill output (logits [1, 1, V], hidden_states[-1]: final states [1, T, d])"""
    d, head = s.draft, s.target.get_output_embeddings()
    if s.beta == 0 or d.output_multiplier != 1.0 or d.softcap or head is None:
        return None
    same = torch.allclose(head(out.hidden_states[-1][:, -1]).float(), out.logits[:, -1].float(), rtol=1e-4, atol=1e-4)
    return head if same else None


@torch.inference_mode()
def guided_generate(
    target,
    draft,
    input_ids: torch.Tensor,  # [1, T]
    *,
    beta: float,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: list[int] | None = None,
    beta_schedule: str = "fixed",
    mix: str = "logits",
    guard_top_k: int | None = None,
    control: str | None = None,
    speculative: bool = False,
    verify_len: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
    donor_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GuidedStats]:
    """Returns `(tokens [1, T + n], stats)`, like `speculative_generate`. Sampling (temperature > 0) draws
    from the guided logits with the usual top-k / top-p filters. `control="noise"` is the null control: the
    draft logits are replaced by Gaussian noise with their per-token mean and std inside the same mix, i.e.
    `(1 - beta) * target + beta * noise` (so guided and noise share the beta axis and meet at beta=0), seeded
    by `generator`'s initial seed (0 without one) and the token position. `control="shuffle"` is the
    shuffled-readout null: new token i is guided by `donor_logits[i]` ([A, V], cycled when shorter), the
    readout's k=1 logits at step i of *another* prompt (`readout_trajectory`): a real readout distribution, as
    confident and as fluent, that knows nothing of this prompt. `on_token(token_id)` is called for every new token
    in order, as soon as it is committed (streaming). `verify_len` (speculative only, 1..B-1, default B-1): how many
    drafted tokens each step verifies; the draft block stays full, so the output does not depend on it. (Speculative
    and token-by-token read the k=1 readout through different passes, equal up to float rounding: exact ties
    aside, identical tokens; a bf16 draft rounds more coarsely than fp32.)"""
    check_sampling(temperature, top_p, top_k)
    temperature = effective_temperature(temperature)  # a tiny temperature is greedy
    check_guided(beta, beta_schedule, mix, guard_top_k, control)
    check_prompt(input_ids, max_new_tokens, target)
    if speculative and temperature > 0:
        raise DraftGuideError("speculative guided decoding is exact for greedy decoding only: use temperature 0")
    if verify_len is not None and not (speculative and 1 <= verify_len < draft.block_size):
        raise DraftGuideError(
            f"verify_len needs speculative=True and 1 <= verify_len < {draft.block_size}, got {verify_len}"
        )
    draft.check_target(target)
    if speculative:
        draft.check_speculative()
    if (control == "shuffle") != (donor_logits is not None):
        raise DraftGuideError(
            "control 'shuffle' takes donor_logits [A, V] (the readout on another prompt), and only it does"
        )
    if donor_logits is not None and (donor_logits.dim() != 2 or donor_logits.shape[0] < 1):
        raise DraftGuideError(f"donor_logits must be [A >= 1, V], got {tuple(donor_logits.shape)}")
    seed = generator.initial_seed() if generator is not None else 0
    s = GuidedSetup(
        target, draft, float(beta), mix, beta_schedule, guard_top_k, control, seed, donor_logits, input_ids.shape[1]
    )
    args = (s, input_ids, max_new_tokens, (temperature, top_p, top_k, generator), set(stop_token_ids or ()), on_token)
    return _speculative(*args, verify_len or draft.block_size - 1) if speculative else _token_by_token(*args)


class _Trace:
    """Per new token: the target's argmax, the guided argmax and the effective beta, kept on the device until
    the end (one sync there, none per step)."""

    def __init__(self):
        self.t_argmax, self.g_argmax, self.betas = [], [], []

    def add(self, t_argmax: torch.Tensor, g_argmax: torch.Tensor, betas: torch.Tensor) -> None:
        # each [n] for n consecutive new tokens
        self.t_argmax.append(t_argmax)
        self.g_argmax.append(g_argmax)
        self.betas.append(betas)

    def finish(self, stats: GuidedStats, n: int) -> None:
        """Flips and the mean effective beta over the first `n` new tokens."""
        if n == 0:
            return
        ta, ga = torch.cat(self.t_argmax)[:n].tolist(), torch.cat(self.g_argmax)[:n].tolist()
        stats.flips = [Flip(i, a, b) for i, (a, b) in enumerate(zip(ta, ga)) if a != b]
        stats.mean_beta = float(torch.cat(self.betas)[:n].mean())


def _token_by_token(s: GuidedSetup, input_ids, max_new_tokens, sampling, stop, on_token):
    target, draft = s.target, s.draft
    dev, T0 = input_ids.device, input_ids.shape[1]
    tcache, dcache = DynamicCache(config=target.config), DraftCache(len(draft.layers))
    stats = GuidedStats(num_input_tokens=T0, beta=s.beta)
    trace, new = _Trace(), []

    t0 = now(dev)
    t_logits, feats, out = prefill(target, input_ids, tcache, draft.target_layer_ids)
    # the block anchored at T0-1 sees context < T0-1 (a speculative draft) or <= T0-1 (an aligned readout)
    aligned = draft.context_includes_anchor
    end = context_end(T0 - 1, aligned)
    ctx, next_ctx = feats[:, :end], feats[:, end:]
    anchor = input_ids[:, -1:]
    head = shared_head(s, out)
    decoder = target.get_decoder() if head is not None else target
    dk = cache_kwarg(decoder)
    t1 = now(dev)
    stats.prefill_s = t1 - t0
    pos = T0  # the position being decoded
    t_state = None  # [1, d]: set when the target's logits wait for the shared head call
    while True:
        h = _draft_block(s, dcache, ctx, anchor, pos - 1)[:, 0]  # [1, d]: block position 1
        if t_logits is None:  # one head call for the target's final state and the draft's k=1 state
            t_logits, d_logits = head(torch.cat([t_state, h.to(t_state.dtype)])).split(1)
        else:
            d_logits = draft.logits(h, target)  # [1, V]
        g, b = s.mixed(t_logits, d_logits, torch.tensor([pos]))
        tok = sample(g, *sampling)  # [1]
        trace.add(t_logits.argmax(-1), g.argmax(-1), b)
        new.append(tok)
        tid = int(tok)
        if on_token is not None:
            on_token(tid)
        if len(new) >= max_new_tokens or tid in stop:
            break
        anchor = tok[:, None]
        out = decoder(
            anchor,
            position_ids=torch.tensor([[pos]], device=dev),
            **{dk: tcache},
            use_cache=True,
            output_hidden_states=True,
        )
        new_ctx = extract_features(out.hidden_states, draft.target_layer_ids)  # features of position pos
        ctx, next_ctx = (new_ctx, None) if aligned else (next_ctx, new_ctx)
        if head is None:
            t_logits = out.logits[:, -1]
        else:
            t_logits, t_state = None, out.last_hidden_state[:, -1]  # [1, d]: logits come with the draft's
        pos += 1

    tokens = torch.cat([input_ids, torch.stack(new, 1)], 1)
    stats.decode_s = now(dev) - t1
    stats.num_new_tokens = len(new)
    trace.finish(stats, len(new))
    return tokens, stats


def _speculative(s: GuidedSetup, input_ids, max_new_tokens, sampling, stop, on_token, n_verify: int):
    """Exact speculative guided greedy (see the module docstring). Invariant at the top of each step: the
    anchor at `start` is committed but unread by the target; the draft cache holds context < len(dcache)
    and `ctx` the features of positions len(dcache)..start-1. Verifies `n_verify` drafted tokens a step."""
    target, draft = s.target, s.draft
    B, dev, T0 = draft.block_size, input_ids.device, input_ids.shape[1]
    max_len = T0 + max_new_tokens
    buf = token_buffer(input_ids, max_new_tokens, B, draft.mask_token_id)  # [1, max_len + B]
    tcache, dcache = DynamicCache(config=target.config), DraftCache(len(draft.layers))
    stats, trace = GuidedStats(num_input_tokens=T0, beta=s.beta), _Trace()

    t0 = now(dev)
    t_logits, feats, out = prefill(target, input_ids, tcache, draft.target_layer_ids)
    head = shared_head(s, out)
    verifier = target.get_decoder() if head is not None else target
    vk = cache_kwarg(verifier)
    ctx = _first_token(s, dcache, buf, feats, t_logits, trace, T0)
    _, stopped = _emit(buf, T0, 1, stop, on_token)
    t1 = now(dev)
    stats.prefill_s = t1 - t0

    start = T0
    while start + 1 < max_len and not stopped:
        vs = min(n_verify + 1, max_len - start)  # anchor + vs-1 proposals verified (the draft block stays full)
        dlogits = _draft_k1(s, dcache, ctx, buf[:, start : start + 1], start, n=vs - 1)  # [vs-1, V]; cache now < start
        block = buf[:, start : start + vs].clone()
        block[0, 1:] = dlogits.argmax(-1)
        out = verify_block(verifier, block, start, tcache, vk)
        feats = extract_features(out.hidden_states, draft.target_layer_ids)  # [1, vs, n*d]: positions start..
        t_logits, g, b = _verified_logits(s, dcache, out, feats, block, start, dlogits[:1], head)
        guided = g.argmax(-1)  # [vs]
        acc = accepted_length(block[0, 1:], guided)
        produced = commit(buf, start, block[0, 1:], acc, guided[acc], max_len)
        produced, stopped = _emit(buf, start + 1, produced, stop, on_token)
        trace.add(t_logits[:produced].argmax(-1), guided[:produced], b[:produced])
        ctx = _keep_committed_context(dcache, feats, start, produced)
        start += produced
        crop_cache(tcache, start)
        stats.acceptance_lengths.append(produced)

    tokens = buf[:, : min(start + 1, max_len)]
    stats.decode_s = now(dev) - t1
    stats.num_new_tokens = tokens.shape[1] - T0
    trace.finish(stats, stats.num_new_tokens)
    return tokens, stats


def _first_token(s: GuidedSetup, dcache: DraftCache, buf, feats, t_logits, trace: _Trace, T0: int) -> torch.Tensor:
    """The first new token by one plain guided step from the prompt's last token (there is no block to verify
    yet): written to buf[0, T0]. Returns the features the draft has not read yet.
    # feats: [1, T0, n*d] of the prompt, t_logits: [1, V] the target's after the prefill"""
    end = context_end(T0 - 1, s.draft.context_includes_anchor)
    d_logits = _draft_k1(s, dcache, feats[:, :end], buf[:, T0 - 1 : T0], T0 - 1)  # [1, V]
    g, b = s.mixed(t_logits, d_logits, torch.tensor([T0]))
    buf[0, T0] = g.argmax(-1)[0]
    trace.add(t_logits.argmax(-1), g.argmax(-1), b)
    return feats[:, end:]


def _verified_logits(s: GuidedSetup, dcache: DraftCache, out, feats, block, start: int, d_anchor, head):
    """Both models' next-token logits at the anchor and after each verified proposal, and their mix: the target's
    from the verify forward `out`, the draft's k=1 readout at the anchor from the proposal pass (`d_anchor`) and
    after each proposal from one multi-anchor pass (`_draft_k1_many`, which caches the features of
    start..start+vs-2). With a shared `head`, one head call for both models.
    # feats: [1, vs, n*d], block: [1, vs], d_anchor: [1, V] -> target [vs, V], guided [vs, V], betas [vs]"""
    vs = block.shape[1]
    h = _draft_k1_many(s, dcache, feats[:, : vs - 1], block, start)  # [vs-1, d]
    if head is None:
        t_logits, d_rest = out.logits[0], s.draft.logits(h, s.target)
    else:  # one head call (one read of the vocabulary matrix) for both models' next-token logits
        t_state = out.last_hidden_state[0]  # [vs, d]
        t_logits, d_rest = head(torch.cat([t_state, h.to(t_state.dtype)])).split([vs, vs - 1])
    g, b = s.mixed(t_logits, torch.cat([d_anchor, d_rest]), torch.arange(start + 1, start + vs + 1))
    return t_logits, g, b


def _keep_committed_context(dcache: DraftCache, feats: torch.Tensor, start: int, produced: int) -> torch.Tensor:
    """After the step at `start` committed `produced` tokens: the multi-anchor pass cached the draft K/V of
    positions < start+vs-1; keep the committed ones and return the features still to feed, so that no context
    position is projected twice. # feats: [1, vs, n*d] of positions start.. -> [1, C', n*d]"""
    keep = min(produced, feats.shape[1] - 1)
    dcache.crop(start + keep)
    return feats[:, keep:produced]


def _emit(buf: torch.Tensor, first: int, n: int, stop: set[int], on_token) -> tuple[int, bool]:
    """Stream buf[0, first : first + n] token by token; returns (n cut just after a stop token, stopped)."""
    if not stop and on_token is None:
        return n, False
    tokens, stopped = read_committed(buf, first, n, stop)
    for t in tokens:
        if on_token is not None:
            on_token(t)
    return len(tokens), stopped


def _draft_k1_many(
    s: GuidedSetup, dcache: DraftCache, ctx: torch.Tensor, block: torch.Tensor, start: int
) -> torch.Tensor:
    """k=1 draft states [vs-1, d] (the head not yet applied) for anchors start+1..start+vs-1 (the proposed
    tokens), in one masked pass over cached context < start plus `ctx` (features of start..start+vs-2).
    Appends `ctx` to the cache.
    # ctx: [1, vs-1, n*d], block: [1, vs] = [anchor, proposals]"""
    d, dev = s.draft, block.device
    B, m = d.block_size, block.shape[1] - 1
    local = torch.arange(1, m + 1, device=dev)[None]  # [1, m] anchors within `block`
    ids, pos = block_inputs(block, local, B, d.mask_token_id)  # [1, m*B]
    C = start + m  # context columns: cached (< start) then the m new ones
    mask = BlockMask(context_visible(start + local, C, B, d.context_includes_anchor), B)  # [1, 1, m*B, C]
    position_ids = torch.cat([torch.arange(start, C, device=dev)[None], pos + start], 1)
    return d(d.embed(s.target, ids), ctx, position_ids, cache=dcache, attention_mask=mask, rows=slice(1, 2))[
        0
    ]  # [m, d]


@torch.inference_mode()
def readout_trajectory(target, draft, input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The readout's k=1 next-token logits [A, V] along a continuation `tokens` (A >= 1) of `input_ids`
    [1, T]: row i is what the readout predicts for new token i, reading the target's features of the prompt and
    tokens < i (teacher forcing: one target forward and one multi-anchor readout pass; equal to token-by-token
    decoding up to float rounding). The donor of the shuffled-readout null."""
    from draftguide.modeling.readout import readout_logits

    if not tokens:
        raise DraftGuideError("readout_trajectory needs at least one continuation token")
    dev, T = input_ids.device, input_ids.shape[1]
    ids = torch.cat([input_ids, torch.tensor([tokens], device=dev)], 1)
    out = target(ids, output_hidden_states=True, logits_to_keep=1)
    feats = extract_features(out.hidden_states, draft.target_layer_ids).to(next(draft.parameters()).dtype)
    return readout_logits(draft, target, feats, ids, T, ["next"])["next"][0].float()


__all__ = ["Flip", "GuidedStats", "guide", "guided_generate", "js_divergence", "noise_logits", "readout_trajectory"]
