"""Batched decoding: many prompts decoded together, with left padding, an attention mask, per-row position
ids and KV caches, for greedy decoding, temperature / top-p / top-k sampling and draft-guided decoding (any
readout, any beta, the noise control). Rows leave the batch as soon as they finish (compaction): the caches,
masks and pending features keep only the live rows, and leading columns that are padding in every live row
are dropped; with `max_batch`, a waiting prompt takes the freed slot at once (continuous batching), so one
long answer does not hold the others' compute. Each prompt is prefilled alone, exactly as at batch 1 (prefill
is compute-bound: a padded prefill of 16 similar-length prompts together measured no faster on this CPU).

Every row decodes exactly what the batch-1 loop (`greedy_generate`, `baselines.sample_generate`,
`guided.guided_generate` token by token) decodes for it alone, up to float rounding: each row keeps its own
sampling parameters, its own generator (a seed per row) and its own stop tokens and token budget.

Layout: rows are right-aligned in `W` columns; column `c` of row `i` is position `c - pad_i`. The target
cache and the draft's `DraftCache` share that column layout (the draft cache trails the target's by the one
or two columns whose features are still pending); pads are masked in both (`DFlashDraft.forward(context_mask=)`).
A joining row's draft context is projected into the draft cache in one call (`DFlashDraft.context_kv`).
Power Sampling, DoLa and speculative decoding stay batch 1 (`SINGLE_ONLY`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from draftguide.decode.common import GenStats, cache_kwarg, now
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import context_end
from draftguide.modeling.sampling import check_sampling, effective_temperature, sample
from draftguide.modeling.targets import extract_features

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
        ids[i, L - p.numel() :] = p.to(device)
        mask[i, L - p.numel() :] = True
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
    max_batch: int | None = None,
    on_done: Callable[[int, BatchRow], None] | None = None,
) -> list[BatchRow]:
    """Decode every prompt of `prompts` (token ids [T_i] or [1, T_i]), at most `max_batch` at a time (None: all
    at once): a row that finishes leaves the batch and the next waiting prompt takes its place (continuous
    batching), so one long answer does not leave the others' slots idle. Per row (a scalar applies to all):
    `max_new_tokens`, `temperature`, `top_p`, `top_k`, `generators` (a seed per row: a row draws what it would
    draw alone with that generator), `stop_token_ids` (one list for all, or a list per row). With a `draft`,
    guided decoding as `guided_generate(speculative=False)` with the shared guidance settings (the noise control
    seeds each row by its generator's initial seed, as batch 1 does); without one, plain decoding (the target's
    logits). `on_token(row, token_id)` sees every new token as it is chosen; returning True ends that row there
    (a stop string, a client gone); `on_done(row, result)` sees each row as soon as it is finished. Returns a
    `BatchRow` per prompt, in order. Each row's prefill runs alone (exactly its batch-1 prefill, and no compute
    on padding); its cache then joins the left-padded batch cache."""
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
    cap = n if max_batch is None else int(max_batch)
    if cap < 1:
        raise DraftGuideError(f"max_batch must be >= 1, got {max_batch}")
    from draftguide.modeling.prompts import check_length

    for i, (T, m) in enumerate(zip(lens, budgets)):
        if T == 0:
            raise DraftGuideError(f"empty prompt: row {i} has no tokens")
        if m < 1:
            raise DraftGuideError(f"max_new_tokens must be >= 1, got {m} (row {i})")
        check_length(target, T, m, f"row {i}")

    setup = None
    if draft is not None:
        from draftguide.decode.guided import GuidedSetup, check_guided

        check_guided(beta, beta_schedule, mix, guard_top_k, control)
        draft.check_target(target)
        seeds = [g.initial_seed() if g is not None else 0 for g in gens]
        setup = GuidedSetup(target, draft, float(beta), mix, beta_schedule, guard_top_k, control, 0)

    st = _State(target, draft, setup)
    new: list[list[int]] = [[] for _ in range(n)]
    reason = ["length"] * n
    stats = [_new_stats(setup, T) for T in lens]
    flips_t: list[list[int]] = [[] for _ in range(n)]
    flips_g: list[list[int]] = [[] for _ in range(n)]
    betas: list[list[float]] = [[] for _ in range(n)]
    started = [0.0] * n
    results: list = [None] * n
    waiting = list(range(n))
    dev = st.dev

    def finish(r: int) -> None:
        s = stats[r]
        s.num_new_tokens = len(new[r])
        s.decode_s = now(dev) - started[r]
        if setup is not None and new[r]:
            from draftguide.decode.guided import Flip

            s.flips = [Flip(i, a, c) for i, (a, c) in enumerate(zip(flips_t[r], flips_g[r])) if a != c]
            s.mean_beta = sum(betas[r]) / len(betas[r])
        results[r] = BatchRow(new[r], reason[r], s)
        if on_done is not None:
            on_done(r, results[r])

    while waiting or st.live:
        if waiting and len(st.live) < cap:  # fill the free slots
            join, waiting = waiting[: cap - len(st.live)], waiting[cap - len(st.live) :]
            for r, t_pre in st.join(join, prompts):
                stats[r].prefill_s = t_pre
                started[r] = now(dev)
        live, b = st.live, len(st.live)
        if setup is not None:
            h = st.draft_state()  # [b, d]
            if st.head is not None:  # one head call for both models' next-token logits
                t_logits, d_logits = st.head(torch.cat([st.t_state, h.to(st.t_state.dtype)])).split(b)
            else:
                t_logits, d_logits = st.t_logits, draft.logits(h, target)  # [b, V]
            if control == "noise":
                from draftguide.decode.guided import noise_logits

                d_logits = torch.cat(
                    [noise_logits(d_logits[j : j + 1], st.nxt[j : j + 1].cpu(), seeds[r]) for j, r in enumerate(live)]
                )
            from draftguide.decode.guided import guide

            g, bt = guide(t_logits, d_logits, setup.beta, mix=mix, beta_schedule=beta_schedule, guard_top_k=guard_top_k)
            ta, ga, bl = t_logits.argmax(-1).tolist(), g.argmax(-1).tolist(), bt.tolist()
        else:
            g = st.t_logits
        toks = g.argmax(-1)  # [b]: greedy rows; sampling rows are drawn one by one, each from its own generator
        for j, r in enumerate(live):
            if temps[r] > 0:
                toks[j] = sample(g[j : j + 1], temps[r], tps[r], tks[r], gens[r])[0]
        tl = toks.tolist()
        keep = []
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
            finish(r)
        if len(keep) < b:
            st.keep(keep)  # compaction: finished rows leave every per-row tensor and both caches
            toks = toks[torch.tensor(keep, dtype=torch.long, device=dev)]
        if st.live:
            st.feed(toks)
    return results


class _State:
    """The live batch: rows right-aligned in W columns (column c of row j is position c - pads[j]).

    Invariant at the top of a step: the target cache holds columns [0, W) (the last one is each row's anchor, the
    latest token, already read by the target), `t_logits` (or `t_state`, the final states, when one head call
    gives both models' logits) its next-token output; with a draft, the draft cache holds context columns
    [0, context_end(W - 1) - 1), `ctx` [b, 1, k*d] the features of the next context column and `pending` those of the
    anchor column while the draft may not see it (a speculative draft; empty for an aligned readout)."""

    def __init__(self, target, draft, setup):
        self.target, self.draft, self.setup = target, draft, setup
        self.dev = next(target.parameters()).device
        self.ck = cache_kwarg(target)
        self.live: list[int] = []
        self.includes_anchor = bool(draft is not None and draft.context_includes_anchor)
        self.head, self.decoder, self.dk = None, target, self.ck
        self.decided = False  # whether one head call serves both models (decided on the first prefill)
        self._empty()

    def _empty(self) -> None:
        from draftguide.modeling.draft import DraftCache

        dev = self.dev
        self.tcache = DynamicCache(config=self.target.config)
        self.W = 0
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=dev)
        self.pads = torch.zeros(0, dtype=torch.long, device=dev)
        self.nxt = torch.zeros(0, dtype=torch.long, device=dev)
        self.anchor = torch.zeros(0, dtype=torch.long, device=dev)
        self.t_logits = self.t_state = None
        if self.draft is not None:
            self.dcache = DraftCache(len(self.draft.layers))
            self.ctx = self.pending = None

    # -- rows in -----------------------------------------------------------------------------------------
    def join(self, rows: list[int], prompts) -> list[tuple[int, float]]:
        """Prefill each of `rows` alone and add it to the batch. Returns (row, prefill seconds) per row."""
        target, draft, dev = self.target, self.draft, self.dev
        hidden = draft is not None
        pre = []
        for r in rows:
            t0 = now(dev)
            ids = prompts[r].reshape(1, -1).to(dev)
            T = ids.shape[1]
            c = DynamicCache(config=target.config)
            out = target(
                ids,
                position_ids=torch.arange(T, device=dev)[None],
                **{self.ck: c},
                use_cache=True,
                output_hidden_states=hidden,
                logits_to_keep=1,
            )
            if hidden and not self.decided:
                from draftguide.decode.guided import shared_head

                self.head, self.decided = shared_head(self.setup, out), True
                self.decoder = target.get_decoder() if self.head is not None else target
                self.dk = cache_kwarg(self.decoder)
            item = {"r": r, "T": T, "ids": ids, "cache": c, "logits": out.logits[:, -1]}
            if hidden:
                item["feats"] = extract_features(out.hidden_states, draft.target_layer_ids)  # [1, T, k*d]
                item["state"] = out.hidden_states[-1][:, -1]  # the final (normed) state the head reads
            item["prefill_s"] = now(dev) - t0
            pre.append(item)
        b0 = len(self.live)
        W = max([self.W, 2] + [x["T"] for x in pre])  # at least 2 columns: a context column before every anchor
        self._pad_left(W - self.W)
        # the target cache: each new row right-aligned in W columns, zeros (masked) on the left
        for j, layer_kv in enumerate(zip(*[[(lay.keys, lay.values) for lay in x["cache"].layers] for x in pre])):
            ks = torch.cat([_pad_cols(k, W) for k, _ in layer_kv])
            vs = torch.cat([_pad_cols(v, W) for _, v in layer_kv])
            if b0 == 0:
                self.tcache.update(ks, vs, j)
            else:
                lay = self.tcache.layers[j]
                lay.keys, lay.values = torch.cat([lay.keys, ks]), torch.cat([lay.values, vs])
        m = torch.zeros(len(pre), W, dtype=torch.bool, device=dev)
        for i, x in enumerate(pre):
            m[i, W - x["T"] :] = True
        T_new = torch.tensor([x["T"] for x in pre], device=dev)
        self.mask = torch.cat([self.mask.reshape(b0, W), m])
        self.pads = torch.cat([self.pads, W - T_new])
        self.nxt = torch.cat([self.nxt, T_new])
        self.anchor = torch.cat([self.anchor, torch.cat([x["ids"][0, -1:] for x in pre])])
        self.live = self.live + [x["r"] for x in pre]
        if draft is None or self.head is None:
            logits = torch.cat([x["logits"] for x in pre])
            self.t_logits = logits if b0 == 0 else torch.cat([self.t_logits, logits])
        else:
            states = torch.cat([x["state"] for x in pre])
            self.t_state = states if b0 == 0 else torch.cat([self.t_state, states])
        if draft is not None:
            self._join_draft(pre, W, b0)
        return [(x["r"], x["prefill_s"]) for x in pre]

    def _join_draft(self, pre: list[dict], W: int, b0: int) -> None:
        """The new rows' draft context: columns [0, context_end(W - 1) - 1) projected into the draft cache now, the next
        one as `ctx`, the anchor's as `pending` (a speculative draft)."""
        draft, dev, a = self.draft, self.dev, int(self.includes_anchor)
        f = torch.zeros(len(pre), W, pre[0]["feats"].shape[-1], dtype=pre[0]["feats"].dtype, device=dev)
        for i, x in enumerate(pre):
            f[i, W - x["T"] :] = x["feats"][0]
        # the anchor is column W - 1; the newest visible column (`ctx`) is the last before context_end
        D = context_end(W - 1, self.includes_anchor) - 1  # context columns the cache holds
        pads = W - torch.tensor([x["T"] for x in pre], device=dev)
        pos = (torch.arange(D, device=dev)[None] - pads[:, None]).clamp_min(0)
        dc = self.dcache
        if D > 0:
            for j, (k, v) in enumerate(draft.context_kv(f[:, :D], pos)):
                if b0 == 0 or dc.k[j] is None:
                    dc.k[j], dc.v[j] = k, v
                else:
                    dc.k[j], dc.v[j] = torch.cat([dc.k[j], k]), torch.cat([dc.v[j], v])
        ctx, pending = f[:, D : D + 1], f[:, W - 1 : W][:, : 1 - a]
        self.ctx = ctx if b0 == 0 else torch.cat([self.ctx, ctx])
        self.pending = pending if b0 == 0 else torch.cat([self.pending, pending])

    def _pad_left(self, k: int) -> None:
        """Widen the live batch by `k` padding columns on the left."""
        if k <= 0:
            return
        self.W += k
        if not self.live:
            return
        for lay in self.tcache.layers:
            lay.keys, lay.values = (
                _pad_cols(lay.keys, lay.keys.shape[2] + k),
                _pad_cols(lay.values, lay.values.shape[2] + k),
            )
        self.mask = torch.cat([self.mask.new_zeros(len(self.live), k), self.mask], 1)
        self.pads = self.pads + k
        if self.draft is not None:
            dc = self.dcache
            for j in range(len(dc.k)):
                if dc.k[j] is not None:
                    dc.k[j], dc.v[j] = (
                        _pad_cols(dc.k[j], dc.k[j].shape[2] + k),
                        _pad_cols(dc.v[j], dc.v[j].shape[2] + k),
                    )

    # -- a step ------------------------------------------------------------------------------------------
    def draft_state(self) -> torch.Tensor:
        """Block position 1's draft state [b, d] per row; appends `ctx` to the draft cache."""
        s, d, dev = self.setup, self.draft, self.dev
        b, B = len(self.live), d.block_size
        block = torch.full((b, B), d.mask_token_id, dtype=torch.long, device=dev)
        block[:, 0] = self.anchor
        c0 = context_end(self.W - 1, self.includes_anchor) - 1  # the column `ctx` holds (anchor: W - 1)
        ctx_pos = (c0 - self.pads[:, None]).clamp_min(0)  # a pad column: any position (masked)
        blk_pos = (self.nxt - 1)[:, None] + torch.arange(B, device=dev)[None]
        return d(
            d.embed(s.target, block),
            self.ctx,
            torch.cat([ctx_pos, blk_pos], 1),
            cache=self.dcache,
            rows=slice(1, 2),
            context_mask=self.mask[:, : c0 + 1],
        )[:, 0]

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` (indices into `live`) stay; columns that are padding in every live row are dropped."""
        if not keep:
            self.live = []
            self._empty()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
        self.live = [self.live[j] for j in keep]
        self.tcache.batch_select_indices(idx)
        self.mask, self.pads, self.nxt, self.anchor = self.mask[idx], self.pads[idx], self.nxt[idx], self.anchor[idx]
        if self.t_logits is not None:
            self.t_logits = self.t_logits[idx]
        if self.t_state is not None:
            self.t_state = self.t_state[idx]
        if self.draft is not None:
            self.dcache.select_rows(idx)
            self.ctx, self.pending = self.ctx[idx], self.pending[idx]
        drop = min(int(self.pads.min()), self.W - 2)  # keep 2 columns at least (a context column before every anchor)
        if drop > 0:
            for lay in self.tcache.layers:
                lay.keys, lay.values = lay.keys[..., drop:, :], lay.values[..., drop:, :]
            if self.draft is not None:
                self.dcache.drop_left(drop)
            self.mask, self.pads, self.W = self.mask[:, drop:], self.pads - drop, self.W - drop

    def feed(self, toks: torch.Tensor) -> None:
        """The chosen tokens [b] become the anchors: one new column, real in every live row."""
        b = len(self.live)
        self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], 1)
        self.W += 1
        pos = self.nxt[:, None]
        self.nxt = self.nxt + 1
        self.anchor = toks
        if self.draft is None:
            out = self.target(
                toks[:, None],
                attention_mask=self.mask.long(),
                position_ids=pos,
                **{self.ck: self.tcache},
                use_cache=True,
                logits_to_keep=1,
            )
            self.t_logits = out.logits[:, -1]
            return
        out = self.decoder(
            toks[:, None],
            attention_mask=self.mask.long(),
            position_ids=pos,
            **{self.dk: self.tcache},
            use_cache=True,
            output_hidden_states=True,
        )
        new_ctx = extract_features(out.hidden_states, self.draft.target_layer_ids)  # [b, 1, k*d]: the fed column
        self.ctx, self.pending = (new_ctx, self.pending) if self.includes_anchor else (self.pending, new_ctx)
        if self.head is None:
            self.t_logits = out.logits[:, -1]
        else:
            self.t_state = out.last_hidden_state[:, -1]


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [b, H, C, D] with zero columns on the left, to `width` columns."""
    k = width - x.shape[2]
    if k <= 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], k, x.shape[3]), x], 2)


def _new_stats(setup, T: int) -> GenStats:
    if setup is None:
        return GenStats(num_input_tokens=T)
    from draftguide.decode.guided import GuidedStats

    return GuidedStats(num_input_tokens=T, beta=setup.beta)


__all__ = ["BatchRow", "SINGLE_ONLY", "batch_generate", "left_pad", "single_only_note"]
