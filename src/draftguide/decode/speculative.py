"""Lossless speculative decoding with a DFlash draft, and the plain decoding it is measured against.

One verify step: the draft fills `[anchor, MASK x (B-1)]` in one pass from the cached context, the
target scores the block in one forward, the longest prefix the target agrees with is committed plus
one bonus token from the target, and both caches keep only committed positions. The draft cache only
ever holds context, so it never needs cropping; the target cache is cropped to the committed length.
Acceptance length = tokens committed by one verify step, bonus included (at most B).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
from draftguide.modeling.draft import DFlashDraft, DraftCache
from draftguide.modeling.sampling import (
    check_sampling,
    effective_temperature,
    probs_from_logits,
    rejection_sample,
    sample,
    sample_probs,
)
from draftguide.modeling.targets import extract_features


class SubsetHead:
    """FR-Spec (Zhao et al. 2025, arXiv 2502.14856): the draft scores only a subset of the vocabulary (the V'
    most frequent tokens) when it proposes; logits outside the subset are -inf, so proposals come from the
    subset and, at temperature > 0, q is 0 outside it. The target verifies with its full head, so greedy output
    is unchanged and rejection sampling stays exact; only acceptance can drop (a target token outside the
    subset is never proposed). On a CPU the full head is most of a draft step's cost at batch 1.
    `token_ids` [V'] (any order); the head rows are kept in the draft's dtype."""

    def __init__(self, draft: DFlashDraft, target, token_ids: torch.Tensor):
        head = target.get_output_embeddings()
        dev = head.weight.device
        self.ids = torch.as_tensor(token_ids, dtype=torch.long, device=dev).unique()  # sorted
        self.weight = head.weight[self.ids].to(next(draft.parameters()).dtype)  # [V', d]
        self.vocab, self.draft = head.weight.shape[0], draft

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [..., n, d] -> logits [..., n, V] (float32; -inf outside the subset)
        sub = (hidden.to(self.weight.dtype) @ self.weight.T).float() * self.draft.output_multiplier
        if self.draft.softcap:
            sub = torch.tanh(sub / float(self.draft.softcap)) * float(self.draft.softcap)
        out = torch.full((*sub.shape[:-1], self.vocab), float("-inf"), device=sub.device)
        return out.index_copy_(-1, self.ids, sub)


RANKING_FILE = "vocab_ranking.safetensors"  # token ids by falling frequency, beside a draft's weights


def save_vocab_ranking(folder, counts: torch.Tensor) -> None:
    """Write the token ranking (ids by falling count, ties by id) that `--draft-vocab N` takes the top of.
    Official dflash ignores the extra file. # counts: [V] token counts of the draft's training text"""
    from safetensors.torch import save_file

    order = torch.argsort(-counts.double() + torch.arange(len(counts)) * 1e-9 / len(counts), stable=True)
    save_file({"token_ids": order.to(torch.int32).contiguous()}, str(Path(folder) / RANKING_FILE))


def vocab_ranking(folder) -> torch.Tensor | None:
    """A draft folder's token ids by falling frequency [V], or None when it ships no ranking (or is `init`)."""
    from safetensors.torch import load_file

    from draftguide.modeling.draft_io import draft_path

    path = None if folder is None or str(folder).startswith("init") else draft_path(folder) / RANKING_FILE
    return load_file(str(path))["token_ids"].long() if path is not None and path.is_file() else None


def load_draft_vocab(folder, size: int) -> torch.Tensor:
    """The `size` most frequent token ids of a draft folder's ranking. Raises DraftGuideError without one."""
    ranked = vocab_ranking(folder)
    if ranked is None:
        raise DraftGuideError(
            f"--draft-vocab needs {RANKING_FILE} in the draft folder '{folder}' (token ranking by frequency)"
        )
    if not 1 <= size <= len(ranked):
        raise DraftGuideError(f"--draft-vocab must be in [1, {len(ranked)}], got {size}")
    return ranked[:size]


@torch.inference_mode()
def speculative_generate(
    target,
    draft: DFlashDraft,
    input_ids: torch.Tensor,  # [1, T]
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: list[int] | None = None,
    verify_len: int | None = None,
    generator: torch.Generator | None = None,
    verify_costs: list[float] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    read_costs: list[float] | None = None,
    draft_head: "SubsetHead | None" = None,
) -> tuple[torch.Tensor, GenStats]:
    """Returns `(tokens [1, T + n], stats)`. Greedy output equals the target's own greedy output; at
    temperature > 0 rejection sampling keeps the target's distribution. `verify_len` (1..B-1, default
    B-1) verifies only the first drafted tokens: the draft still fills the full block, so its proposals
    are unchanged, while a shorter target forward can pay off when late offsets are rarely accepted.
    `verify_costs` ([c_1..c_B], seconds of a target forward over n tokens; see `measure_verify_costs`)
    switches on adaptive verification: each step verifies the n drafted tokens that maximise expected
    committed tokens per second, the expectation taken from the draft's own confidences. Exactness does
    not depend on n: it is chosen before the target is consulted. `read_costs` ([r_1..r_{B-1}], seconds of a
    draft step that reads n offsets; see `measure_read_costs`; used only with `verify_costs`) makes reading
    the confidences part of the trade: each step first picks how many offsets are worth reading at all, from
    the acceptance rate per offset seen so far in this generation and both cost curves, then chooses n among
    those. Where the head is cheap (a GPU) that reads the whole block; on a CPU, where the head over 7
    offsets costs ~3x one, it reads few.
    `on_token(ids)` receives each step's committed tokens as they are committed (streaming); an exception
    it raises ends the generation. `draft_head`: a `SubsetHead` for the draft's proposals (FR-Spec)."""
    check_sampling(temperature, top_p, top_k)
    temperature = effective_temperature(temperature)
    check_prompt(input_ids, max_new_tokens, target)
    draft.check_target(target)
    draft.check_speculative()
    B, dev, T0 = draft.block_size, input_ids.device, input_ids.shape[1]
    n_verify = B - 1 if verify_len is None else max(1, min(int(verify_len), B - 1))
    policy = VerifyPolicy(n_verify, verify_costs, read_costs, AcceptanceRates(B - 1))
    sampling = (temperature, top_p, top_k, generator)
    stop, max_len = set(stop_token_ids or ()), T0 + max_new_tokens
    buf = token_buffer(input_ids, max_new_tokens, B, draft.mask_token_id)  # [1, max_len + B]
    tcache, dcache, ck = DynamicCache(config=target.config), DraftCache(len(draft.layers)), cache_kwarg(target)
    stats = GenStats(num_input_tokens=T0)

    t0 = now(dev)
    logits, ctx, _ = prefill(target, input_ids, tcache, draft.target_layer_ids)  # ctx: [1, T0, n*d]
    buf[:, T0] = sample(logits, *sampling)
    stopped = int(buf[0, T0]) in stop
    t1 = now(dev)
    stats.prefill_s = t1 - t0
    if on_token:
        on_token([int(buf[0, T0])])

    start = T0  # position of the anchor: committed, but the target has not read it yet
    while start + 1 < max_len and not stopped:
        block = buf[:, start : start + min(B, max_len - start)].clone()  # [1, dlen] = [anchor, MASK...]
        vs, q = _propose(target, draft, dcache, ctx, block, start, policy, sampling, draft_head)
        out = verify_block(target, block[:, :vs], start, tcache, ck)
        acc, bonus = _accept(block[0, 1:vs], out.logits[0], q, sampling)
        policy.update(acc, vs - 1)
        produced = commit(buf, start, block[0, 1:], acc, bonus, max_len)
        if stop or on_token:
            committed, stopped = read_committed(buf, start + 1, produced, stop)
            produced = len(committed)
            if on_token:
                on_token(committed)
        start += produced
        crop_cache(tcache, start)
        ctx = extract_features(out.hidden_states, draft.target_layer_ids)[:, :produced]  # accepted positions only
        stats.acceptance_lengths.append(produced)

    tokens = buf[:, : min(start + 1, max_len)]
    stats.decode_s = now(dev) - t1
    stats.num_new_tokens = tokens.shape[1] - T0
    return tokens, stats


def _propose(
    target, draft: DFlashDraft, dcache: DraftCache, ctx, block, start: int, policy, sampling, draft_head
) -> tuple[int, torch.Tensor | None]:
    """The draft's step: fills block[0, 1:vs] with proposals and returns `vs` (anchor + proposals to verify) and,
    when sampling, q [vs-1, V], the distribution the proposals were drawn from (None when greedy).
    # ctx: features of the positions not yet in `dcache`; block: [1, dlen] = [anchor, MASK...]"""
    temperature, top_p, top_k, generator = sampling
    read = policy.rows_to_read(block.shape[1])
    h = draft_block(target, draft, dcache, ctx, block, start, rows=slice(1, read))  # [1, read-1, d]
    dlogits = (draft.logits(h, target) if draft_head is None else draft_head(h))[0]  # [read-1, V]
    vs = policy.verify_len(dlogits, read, block.shape[1], temperature)
    dlogits = dlogits[: vs - 1]
    if temperature > 0:
        q = probs_from_logits(dlogits, temperature, top_p, top_k)
        block[0, 1:vs] = sample_probs(q, generator)
        return vs, q
    block[0, 1:vs] = dlogits.argmax(-1)
    return vs, None


def _accept(proposed: torch.Tensor, logits: torch.Tensor, q: torch.Tensor | None, sampling) -> tuple[int, torch.Tensor]:
    """How many proposals the target accepts and its next token after them: greedy agreement, or rejection
    sampling at temperature > 0 (exact). # proposed: [n], logits: [n + 1, V] target, q: [n, V] draft"""
    temperature, top_p, top_k, generator = sampling
    if temperature > 0:
        p = probs_from_logits(logits, temperature, top_p, top_k)  # [n + 1, V]
        return rejection_sample(proposed, p, q, generator)
    posterior = logits.argmax(-1)  # [n + 1]
    acc = accepted_length(proposed, posterior)
    return acc, posterior[acc]


class AcceptanceRates:
    """Per-offset acceptance seen so far in one generation: offset j's rate is the share of steps that reached
    it (offsets < j all accepted) in which it was accepted too. Starts optimistic (one pseudo-try, accepted),
    so offsets not yet verified look worth reading and get tried rather than being written off unseen."""

    def __init__(self, n: int):
        self.hits, self.tries = [1.0] * n, [1.0] * n

    def update(self, accepted: int, verified: int) -> None:
        for j in range(min(accepted + 1, verified)):  # offsets reached: 0..accepted (0-based)
            self.tries[j] += 1
            self.hits[j] += j < accepted

    def rows_worth_reading(self, verify_costs: list[float], read_costs: list[float], n_max: int) -> int:
        """n in 1..n_max maximising expected committed tokens / (a draft step reading n offsets + the target's
        forward over n+1 tokens)."""
        best, best_rate, p, expected = 1, -1.0, 1.0, 1.0
        for n in range(1, min(n_max, len(read_costs), len(verify_costs) - 1) + 1):
            p *= self.hits[n - 1] / self.tries[n - 1]
            expected += p
            rate = expected / (verify_costs[n] + read_costs[n - 1])
            if rate > best_rate:
                best, best_rate = n, rate
        return best


def best_verify_len(dlogits: torch.Tensor, costs: list[float], temperature: float = 0.0) -> int:
    """n in 1..len(dlogits) maximising (1 + E[accepted | n]) / cost(n + 1), where E[accepted | n] sums the
    running products of the draft's top-token probabilities (its own estimate of acceptance per offset).
    # dlogits: [n_max, V]"""
    conf = torch.softmax(dlogits.float() / max(temperature, 1.0), -1).max(-1).values.cumprod(0)  # [n_max]
    expected = 1.0 + conf.cumsum(0)  # [n_max]: committed tokens if n = 1..n_max are verified
    n_max = min(len(costs) - 1, dlogits.shape[0])
    rate = expected[:n_max] / torch.tensor(costs[1 : n_max + 1], dtype=expected.dtype)
    return int(rate.argmax()) + 1


class VerifyPolicy:
    """How many block offsets a step reads and verifies: always `n_verify`, or, given `verify_costs`, adaptive
    (see `speculative_generate`): the draft reads the whole block (or, given `read_costs` too, as many offsets
    as `seen` says are worth it) and `best_verify_len` picks how many to verify from the draft's confidences."""

    def __init__(
        self,
        n_verify: int,
        verify_costs: list[float] | None = None,
        read_costs: list[float] | None = None,
        seen: AcceptanceRates | None = None,
    ):
        self.n_verify, self.verify_costs, self.read_costs, self.seen = n_verify, verify_costs, read_costs, seen

    def adaptive(self, dlen: int) -> bool:
        return self.verify_costs is not None and dlen > 2

    def rows_to_read(self, dlen: int) -> int:
        """`read`: the draft computes block offsets 1..read-1 of a block of `dlen` tokens."""
        if not self.adaptive(dlen):
            return min(self.n_verify + 1, dlen)
        return (
            dlen
            if self.read_costs is None
            else 1 + self.seen.rows_worth_reading(self.verify_costs, self.read_costs, dlen - 1)
        )

    def verify_len(self, dlogits: torch.Tensor, read: int, dlen: int, temperature: float) -> int:
        """`vs`: the target verifies the anchor and proposals 1..vs-1. # dlogits: [read-1, V]"""
        if self.adaptive(dlen) and read > 2:
            return best_verify_len(dlogits, self.verify_costs, temperature) + 1
        return read

    def update(self, accepted: int, verified: int) -> None:
        if self.read_costs is not None:
            self.seen.update(accepted, verified)


@torch.inference_mode()
def measure_verify_costs(target, context_len: int = 256, max_tokens: int = 16, repeats: int = 3) -> list[float]:
    """Seconds of one target forward over n = 1..max_tokens new tokens after a `context_len` cache:
    the cost curve adaptive verification trades against acceptance. Returns [c_1, ..., c_max]."""
    dev = next(target.parameters()).device
    vocab = target.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, context_len + max_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    cache, ck = DynamicCache(config=target.config), cache_kwarg(target)
    target(ids[:, :context_len], **{ck: cache}, use_cache=True, logits_to_keep=1)
    costs = []
    for n in range(1, max_tokens + 1):
        best = float("inf")
        for _ in range(repeats):
            t0 = now(dev)
            target(ids[:, context_len : context_len + n], **{ck: cache}, use_cache=True, output_hidden_states=True)
            best = min(best, now(dev) - t0)
            crop_cache(cache, context_len)
        costs.append(best)
    return costs


def draft_read_step(
    target, draft: DFlashDraft, features: torch.Tensor, draft_head: SubsetHead | None = None
) -> Callable[[int], torch.Tensor]:
    """A timing unit: `step(n)` is one cached draft block step as in decoding (the last position of
    `features` is the new context, the others are cached once here) plus the output head over block offsets
    1..n; it leaves the cache as it found it. Returns the logits [1, n, V].
    # features: [1, C + 1, k*d] target features"""
    dev, B, C = features.device, draft.block_size, features.shape[1] - 1
    block = torch.full((1, B), draft.mask_token_id, device=dev)
    pos = torch.arange(C + 1 + B, device=dev)[None]
    cache = DraftCache(len(draft.layers))
    draft(draft.embed(target, block), features[:, :C], pos[:, : C + B], cache=cache)

    def step(n: int) -> torch.Tensor:
        h = draft(draft.embed(target, block), features[:, C:], pos[:, C:], cache=cache, rows=slice(1, n + 1))
        cache.crop(C)
        return draft.logits(h, target) if draft_head is None else draft_head(h)

    return step


@torch.inference_mode()
def measure_read_costs(
    target, draft: DFlashDraft, context_len: int = 256, repeats: int = 3, draft_head: SubsetHead | None = None
) -> list[float]:
    """Seconds to read n = 1..B-1 offsets of a drafted block: one cached draft block step after `context_len`
    cached positions plus the output head over n rows (`draft_read_step`). The price of the draft's proposals
    and confidences. Returns [r_1, ..., r_{B-1}]."""
    dev, dtype = next(target.parameters()).device, next(draft.parameters()).dtype
    width = len(draft.target_layer_ids) * target.get_input_embeddings().weight.shape[1]
    feats = torch.randn(1, context_len + 1, width, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    step = draft_read_step(target, draft, feats, draft_head)  # values do not matter for timing
    costs = []
    for n in range(1, draft.block_size):
        best = float("inf")
        for _ in range(repeats):
            t0 = now(dev)
            step(n)
            best = min(best, now(dev) - t0)
        costs.append(best)
    return costs


@torch.inference_mode()
def greedy_generate(
    target,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[torch.Tensor, GenStats]:
    """Plain autoregressive greedy decoding with a KV cache: one target forward per token. `on_token([id])`
    is called with every new token (streaming)."""
    check_prompt(input_ids, max_new_tokens, target)
    pick = lambda out: out.logits[:, -1].argmax(-1, keepdim=True)  # noqa: E731
    return autoregressive(target, input_ids, max_new_tokens, stop_token_ids, pick, on_token=on_token)


def autoregressive(
    target,
    input_ids,
    max_new_tokens: int,
    stop_token_ids,
    pick,
    stats: GenStats | None = None,
    hidden: bool = False,
    on_token: Callable[[list[int]], None] | None = None,
):
    """One target forward per token with a KV cache; `pick(model output) -> [1, 1]` chooses each token (greedy,
    sampling, DoLa...). Returns `(tokens [1, T + n], stats)` with prefill and decode times apart."""
    dev, T0, stop = input_ids.device, input_ids.shape[1], set(stop_token_ids or ())
    cache, ck = DynamicCache(config=target.config), cache_kwarg(target)
    stats = stats or GenStats(num_input_tokens=T0)
    t0 = t1 = now(dev)
    feed, pos, new = input_ids, torch.arange(T0, device=dev)[None], []
    while True:
        out = target(
            feed, position_ids=pos, **{ck: cache}, use_cache=True, output_hidden_states=hidden, logits_to_keep=1
        )
        tok = pick(out)
        new.append(tok)
        if len(new) == 1:
            t1 = now(dev)
            stats.prefill_s = t1 - t0
        if on_token:
            on_token([int(tok)])
        if len(new) >= max_new_tokens or int(tok) in stop:
            break
        feed, pos = tok, torch.tensor([[T0 + len(new) - 1]], device=dev)
    stats.decode_s = now(dev) - t1
    stats.num_new_tokens = len(new)
    return torch.cat([input_ids, *new], 1), stats


@torch.inference_mode()
def hf_generate(
    target, input_ids: torch.Tensor, max_new_tokens: int, stop_token_ids: list[int] | None = None
) -> tuple[torch.Tensor, GenStats]:
    """HF `generate`, greedy, with a fresh generation config (no model-specific sampling defaults)."""
    from transformers import GenerationConfig

    check_prompt(input_ids, max_new_tokens, target)
    stop = list(stop_token_ids or [])
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=stop or None,
        pad_token_id=stop[0] if stop else 0,
    )
    t0 = now(input_ids.device)
    out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gc)
    stats = GenStats(num_input_tokens=input_ids.shape[1], num_new_tokens=out.shape[1] - input_ids.shape[1])
    stats.decode_s = now(input_ids.device) - t0
    return out, stats


CPU_DRAFT_VOCAB = 8192  # FR-Spec head size on a CPU: fastest of 8K/16K/32K/full, tau unchanged (bench_frspec.py)


def default_draft_vocab(device, folder) -> int | None:
    """The FR-Spec head a speculative run uses unless told otherwise: the `CPU_DRAFT_VOCAB` most frequent tokens
    on a CPU when the draft folder ships a token ranking (the draft's head over 49K tokens is ~40% of a draft
    step there), the full head elsewhere (an accelerator reads it almost for free). Output is unchanged either
    way; measured in `benchmarks/bench_frspec.py` (benchmarks/results/issue13/frspec.json)."""
    ranked = vocab_ranking(folder) if torch.device(device).type == "cpu" else None
    return CPU_DRAFT_VOCAB if ranked is not None and len(ranked) > CPU_DRAFT_VOCAB else None  # else nothing gained


def default_draft_dtype(device, target_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 for the draft next to an fp32 target on a CPU (a draft step reads half the bytes; proposals may
    differ in rare ties, output cannot: the target verifies), else the target's dtype."""
    cpu_fp32 = torch.device(device).type == "cpu" and target_dtype == torch.float32
    return torch.bfloat16 if cpu_fp32 else target_dtype


def default_verify_len(device, temperature: float = 0.0) -> str:
    """'auto' where a verify forward is expensive next to a decode step (a CPU: 16 tokens cost ~2.2x one, and
    the full head over 7 offsets ~3x one), 'full' (the whole block) on an accelerator, where it is almost free.
    Sampling keeps 'full': adaptive lengths follow measured timings, and the random draws with them, so a
    seeded run would not reproduce."""
    return "full" if torch.device(device).type == "cuda" or effective_temperature(temperature) > 0 else "auto"
