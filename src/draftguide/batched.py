"""Batched decoding: many prompts decoded together, with left padding, an attention mask, per-row position
ids and KV caches, for greedy decoding, temperature / top-p / top-k sampling and draft-guided decoding (any
readout, any beta, the noise control). Rows leave the batch as soon as they finish (compaction): the caches,
masks and pending features keep only the live rows, and leading columns that are padding in every live row
are dropped, so one long answer does not carry the others' compute.

Every row decodes exactly what the batch-1 loop (`greedy_generate`, `baselines.sample_generate`,
`guided.guided_generate` token by token) decodes for it alone, up to float rounding: each row keeps its own
sampling parameters, its own generator (a seed per row) and its own stop tokens and token budget.

Layout: prompts are right-aligned in `L` columns; column `c` of row `i` is position `c - pad_i`. The target
cache and the draft's `DraftCache` share that column layout (the draft cache trails the target's by the one
or two columns whose features are still pending); pads are masked in both (`DFlashDraft.forward(context_mask=)`).
Power Sampling, DoLa and speculative decoding stay batch 1 (`SINGLE_ONLY`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .errors import DraftGuideError
from .sampling import check_sampling, effective_temperature, sample
from .speculative import GenStats, _now, cache_kwarg
from .targets import extract_features

# methods whose loops decode one sequence at a time; asked for with a batch size > 1 they run row by row
SINGLE_ONLY = ("power", "dola", "speculative")


def single_only_note(method: str, batch_size: int) -> str | None:
    """The one line to print when a batch-1 method is selected with a batch size, else None."""
    if batch_size > 1 and method in SINGLE_ONLY:
        what = "guided decoding with speculative or ttt" if method == "speculative" else f"method {method!r}"
        return f"note: {what} decodes one sequence at a time; --batch-size {batch_size} runs its rows one by one"
    return None


@dataclass
class BatchRow:
    """One row's result: the new tokens (a final stop token included), why it ended, and its stats."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, or the row's callback ended it) or "length"
    stats: GenStats


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise DraftGuideError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _stop_sets(stop_token_ids, n: int) -> list[set[int]]:
    if not stop_token_ids:
        return [set() for _ in range(n)]
    if isinstance(stop_token_ids[0], (list, tuple, set)):
        return [set(s or ()) for s in _per_row(list(stop_token_ids), n, "stop_token_ids")]
    return [set(stop_token_ids) for _ in range(n)]


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (each [T_i] or [1, T_i]) right-aligned in one [n, L] tensor, and the bool mask of real tokens."""
    flat = [p.reshape(-1) for p in prompts]
    L = max(p.numel() for p in flat)
    ids = torch.full((len(flat), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(flat), L), dtype=torch.bool, device=device)
    for i, p in enumerate(flat):
        ids[i, L - p.numel():] = p.to(device)
        mask[i, L - p.numel():] = True
    return ids, mask


@torch.inference_mode()
def batch_generate(
    target,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int | Sequence[int],
    *,
    stop_token_ids: list[int] | Sequence[list[int]] | None = None,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    generators: Sequence[torch.Generator | None] | None = None,
    draft=None,
    beta: float = 0.0,
    mix: str = "logits",
    beta_schedule: str = "fixed",
    guard_top_k: int | None = None,
    control: str | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[BatchRow]:
    """Decode every prompt of `prompts` (token ids [T_i] or [1, T_i]) in one batch. Per row (a scalar applies
    to all): `max_new_tokens`, `temperature`, `top_p`, `top_k`, `generators` (a seed per row: a row draws
    what it would draw alone with that generator), `stop_token_ids` (one list for all, or a list per row).
    With a `draft`, guided decoding as `guided_generate(speculative=False)` with the shared guidance settings
    (the noise control seeds each row by its generator's initial seed, as batch 1 does); without one, plain
    decoding (the target's logits). `on_token(row, token_id)` sees every new token as it is chosen; returning
    True ends that row there (a stop string, a client gone). Returns a `BatchRow` per prompt, in order."""
    n = len(prompts)
    if n == 0:
        return []
    budgets = [int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
    temps, tps, tks = (_per_row(v, n, k) for v, k in ((temperature, "temperature"), (top_p, "top_p"), (top_k, "top_k")))
    for t, p, k in zip(temps, tps, tks):
        check_sampling(t, p, k)
    temps = [effective_temperature(t) for t in temps]
    gens = _per_row(list(generators) if generators is not None else None, n, "generators")
    stops = _stop_sets(stop_token_ids, n)
    lens = [int(p.numel()) for p in prompts]
    from .prompts import check_length

    for i, (T, m) in enumerate(zip(lens, budgets)):
        if T == 0:
            raise DraftGuideError(f"empty prompt: row {i} has no tokens")
        if m < 1:
            raise DraftGuideError(f"max_new_tokens must be >= 1, got {m} (row {i})")
        check_length(target, T, m, f"row {i}")

    setup = None
    if draft is not None:
        from .guided import _Setup, check_guided

        check_guided(beta, beta_schedule, mix, guard_top_k, control)
        draft.check_target(target)
        seeds = [g.initial_seed() if g is not None else 0 for g in gens]
        setup = _Setup(target, draft, float(beta), mix, beta_schedule, guard_top_k, control, 0)

    dev = next(target.parameters()).device
    ids, mask = left_pad(prompts, device=dev)
    L = ids.shape[1]
    pads = (L - torch.tensor(lens, device=dev))  # [b] leading pad columns per live row
    live = list(range(n))  # original index of each live row
    nxt = torch.tensor(lens, device=dev)  # the position each live row decodes next
    new: list[list[int]] = [[] for _ in range(n)]
    reason = ["length"] * n
    stats = [_new_stats(setup, T) for T in lens]
    flips_t: list[list[int]] = [[] for _ in range(n)]
    flips_g: list[list[int]] = [[] for _ in range(n)]
    betas: list[list[float]] = [[] for _ in range(n)]

    tcache, ck = DynamicCache(config=target.config), cache_kwarg(target)
    t0 = _now(dev)
    # prefill row by row (each exactly its batch-1 prefill; no compute spent on padding, which for prompts of
    # unequal length would cost more than batching saves: prefill is compute-bound), then one left-padded cache
    t_logits, feats, out = _prefill_rows(target, prompts, ids, mask, tcache, ck, setup is not None, draft)
    t_state = None
    if setup is not None:
        from .draft import DraftCache
        from .guided import _shared_head

        aligned = int(draft.context_includes_anchor)
        ctx, pending = feats[:, : L - 1 + aligned], feats[:, L - 1 + aligned:]  # pending: [b, 0 or 1, k*d]
        anchor = ids[:, -1]
        dcache = DraftCache(len(draft.layers))
        head = _shared_head(setup, out)
        decoder = target.get_decoder() if head is not None else target
        dk = cache_kwarg(decoder)
    t1 = _now(dev)
    for s in stats:
        s.prefill_s = t1 - t0

    while True:
        b = len(live)
        if setup is not None:
            h = _draft_k1_state(setup, dcache, ctx, anchor, nxt - 1, pads, mask)  # [b, d]
            if t_logits is None:  # one head call for both models' next-token logits
                t_logits, d_logits = head(torch.cat([t_state, h.to(t_state.dtype)])).split(b)
            else:
                d_logits = draft.logits(h, target)  # [b, V]
            if control == "noise":
                from .guided import noise_logits

                d_logits = torch.cat([noise_logits(d_logits[j : j + 1], nxt[j : j + 1].cpu(), seeds[r]) for j, r in enumerate(live)])
            from .guided import guide

            g, bt = guide(t_logits, d_logits, setup.beta, mix=mix, beta_schedule=beta_schedule, guard_top_k=guard_top_k)
        else:
            g = t_logits
        toks = g.argmax(-1)  # [b]: greedy rows; sampling rows are drawn one by one, each from its own generator
        for j, r in enumerate(live):
            if temps[r] > 0:
                toks[j] = sample(g[j : j + 1], temps[r], tps[r], tks[r], gens[r])[0]
        if setup is not None:
            ta, ga, bl = t_logits.argmax(-1).tolist(), g.argmax(-1).tolist(), bt.tolist()
        tl = toks.tolist()
        keep = []
        now = None
        for j, r in enumerate(live):
            tok = tl[j]
            new[r].append(tok)
            if setup is not None:
                flips_t[r].append(ta[j]), flips_g[r].append(ga[j]), betas[r].append(bl[j])
            ended = bool(on_token(r, tok)) if on_token is not None else False
            if tok in stops[r] or ended:
                reason[r] = "stop"
            elif len(new[r]) < budgets[r]:
                keep.append(j)
                continue
            now = now or _now(dev)
            stats[r].decode_s = now - t1
        if not keep:
            break
        if len(keep) < b:  # compaction: finished rows leave every per-row tensor and both caches
            idx = torch.tensor(keep, device=dev)
            live = [live[j] for j in keep]
            tcache.batch_select_indices(idx)
            mask, pads, nxt, toks = mask[idx], pads[idx], nxt[idx], toks[idx]
            if setup is not None:
                dcache.select_rows(idx)
                pending = pending[idx]
            drop = int(pads.min())
            if drop > 0:  # columns that are padding in every live row
                for layer in tcache.layers:
                    layer.keys, layer.values = layer.keys[..., drop:, :], layer.values[..., drop:, :]
                if setup is not None:
                    dcache.drop_left(drop)
                mask, pads = mask[:, drop:], pads - drop
        # feed the chosen tokens: one new column, real in every live row
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        step_pos = nxt[:, None]
        nxt = nxt + 1
        if setup is None:
            out = target(toks[:, None], attention_mask=mask.long(), position_ids=step_pos, **{ck: tcache}, use_cache=True,
                         logits_to_keep=1)
            t_logits = out.logits[:, -1]
            continue
        out = decoder(toks[:, None], attention_mask=mask.long(), position_ids=step_pos, **{dk: tcache}, use_cache=True,
                      output_hidden_states=True)
        new_ctx = extract_features(out.hidden_states, draft.target_layer_ids)  # [b, 1, k*d]: features of the fed column
        ctx, pending = (new_ctx, pending[:, :0]) if aligned else (pending, new_ctx)
        anchor = toks
        if head is None:
            t_logits = out.logits[:, -1]
        else:
            t_logits, t_state = None, out.last_hidden_state[:, -1]

    for r in range(n):
        st = stats[r]
        st.num_new_tokens = len(new[r])
        if setup is not None and new[r]:
            from .guided import Flip

            st.flips = [Flip(i, a, c) for i, (a, c) in enumerate(zip(flips_t[r], flips_g[r])) if a != c]
            st.mean_beta = sum(betas[r]) / len(betas[r])
    return [BatchRow(new[r], reason[r], stats[r]) for r in range(n)]


def _prefill_rows(target, prompts, ids: torch.Tensor, mask: torch.Tensor, tcache, ck: str, hidden: bool, draft):
    """Each prompt through the target alone; their caches left-padded (zeros, masked) into `tcache`. Returns
    next-token logits [n, V], target features [n, L, k*d] (zeros at pads; None without `hidden`) and the last
    row's output (for `_shared_head`)."""
    n, L = ids.shape
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    logits, feats = [], []
    for i, p in enumerate(prompts):
        T = int(mask[i].sum())
        c = DynamicCache(config=target.config)
        out = target(ids[i : i + 1, L - T:], position_ids=torch.arange(T, device=ids.device)[None], **{ck: c},
                     use_cache=True, output_hidden_states=hidden, logits_to_keep=1)
        logits.append(out.logits[:, -1])
        if hidden:
            feats.append(extract_features(out.hidden_states, draft.target_layer_ids)[0])  # [T, k*d]
        for j, layer in enumerate(c.layers):
            if j == len(per_layer):
                per_layer.append([])
            per_layer[j].append((layer.keys, layer.values))
    for j, kv in enumerate(per_layer):
        k0 = kv[0][0]
        K = k0.new_zeros(n, k0.shape[1], L, k0.shape[3])
        V = kv[0][1].new_zeros(n, kv[0][1].shape[1], L, kv[0][1].shape[3])
        for i, (k, v) in enumerate(kv):
            K[i, :, L - k.shape[2]:], V[i, :, L - v.shape[2]:] = k[0], v[0]
        tcache.update(K, V, j)
    f = None
    if hidden:
        f = feats[0].new_zeros(n, L, feats[0].shape[-1])
        for i, x in enumerate(feats):
            f[i, L - x.shape[0]:] = x
    return torch.cat(logits), f, out


def _new_stats(setup, T: int) -> GenStats:
    if setup is None:
        return GenStats(num_input_tokens=T)
    from .guided import GuidedStats

    return GuidedStats(num_input_tokens=T, beta=setup.beta)


def _draft_k1_state(s, dcache, ctx: torch.Tensor, anchor: torch.Tensor, start: torch.Tensor, pads: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Block position 1's draft state [b, d] of the full block anchored at `start` (per row), from the cached
    context plus `ctx` (the next context columns, [b, C, k*d]); pads are masked out of the draft's attention.
    # anchor, start, pads: [b]; mask: [b, cols] the target's attention mask (column layout shared)"""
    d = s.draft
    B, dev = d.block_size, anchor.device
    b, C = ctx.shape[0], ctx.shape[1]
    block = torch.full((b, B), d.mask_token_id, dtype=torch.long, device=dev)
    block[:, 0] = anchor
    c0 = len(dcache)
    cols = torch.arange(c0, c0 + C, device=dev)[None]  # [1, C] absolute columns of the new context
    ctx_pos = (cols - pads[:, None]).clamp_min(0)  # pad columns: any position (masked)
    blk_pos = start[:, None] + torch.arange(B, device=dev)[None]
    context_mask = mask[:, : c0 + C]
    return d(d.embed(s.target, block), ctx, torch.cat([ctx_pos, blk_pos], 1), cache=dcache, rows=slice(1, 2),
             context_mask=context_mask)[:, 0]


def batches(items: Sequence, batch_size: int, key: Callable | None = None) -> list[list]:
    """`items` in chunks of `batch_size`, sorted by `key` first (similar prompt lengths: less padding)."""
    if batch_size < 1:
        raise DraftGuideError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(items, key=key) if key is not None else list(items)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


__all__ = ["BatchRow", "SINGLE_ONLY", "batch_generate", "batches", "left_pad", "single_only_note"]
