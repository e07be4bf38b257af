"""The DFlash draft (arXiv 2602.06036), compatible by construction with `z-lab/*-DFlash-*` checkpoints.

Qwen3-style decoder layers with no embedding or lm_head of their own (both are borrowed, frozen, from
the target). Target features of several layers are fused by `fc` + `hidden_norm` into a context `c`
that every draft layer sees as extra keys/values; queries come from the block only:

    k = k_norm(cat[k_proj(c), k_proj(ln(h))]),  v = cat[v_proj(c), v_proj(ln(h))]

RoPE at absolute positions, GQA, no causal mask inside the block. Block input: target embeddings of
`[anchor, MASK x (B-1)]`; block position k predicts the token at `anchor + k` (no shift).

One module, two ways to run it:
  (a) inference: a `DraftCache` holds only projected context K/V; each call appends the newly accepted
      context and runs one block whose K/V are never cached (so there is nothing to crop back);
  (b) many anchors in one pass: the whole sequence's context plus m blocks under a block mask
      (block i sees context `< anchor_i` and its own block) -- training, TTT and the diagnostic.

Which context positions a block sees is `context_end` (used by every path). Checkpoint IO, config building
and draft names (shipped drafts, `init`) live in `draft_io`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from draftguide.errors import DraftGuideError


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The official default: `n` layers spread evenly over [1, L-3]; (36, 5) -> [1, 9, 17, 25, 33]."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def draft_value(config, name: str, default=None):
    """Official lookup order: `dflash_config.<name>`, then the top-level config field."""
    dcfg = getattr(config, "dflash_config", None) or {}
    return dcfg.get(name, getattr(config, name, default))


def context_end(anchors, includes_anchor: bool):
    """THE context rule of a readout, in one place: a block anchored at position `a` sees the target features
    of positions `< context_end`, i.e. `< a` for a speculative DFlash draft (the anchor is a token just
    committed: the target has not run it yet, so its features do not exist) and `<= a` for the *aligned
    readout* (`dflash_config.context_includes_anchor`), whose k=1 prediction then sees exactly the positions
    whose last-layer state the target's `lm_head` reads for the same token.
    # anchors: an int or a tensor of any shape of absolute positions -> same type and shape (exclusive end)"""
    return anchors + int(bool(includes_anchor))


def block_rows(x: torch.Tensor, block_size: int, rows: slice, dim: int = 1) -> torch.Tensor:
    """Keep only the offsets `rows` of every block along `dim`, which holds whole blocks one after another.
    # x: [..., m*bs, ...] -> [..., m*n, ...] (n = len(range(bs)[rows]))"""
    blocks = x.unflatten(dim, (x.shape[dim] // block_size, block_size))
    return blocks[(slice(None),) * (dim + 1) + (rows,)].flatten(dim, dim + 1)


def _check_supported(config) -> None:
    """Raise a one-line DraftGuideError for the draft variants this module does not implement."""
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise DraftGuideError(f"draft layer types {sorted(set(types))} not supported (only full_attention)")
    if draft_value(config, "conv_kernel_size") is not None:
        raise DraftGuideError("DFlash2 drafts (conv + candidate selector) are not supported")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D], cos/sin: [B, T, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DraftCache:
    """Per-layer K/V of the projected *context* only (already normed and rotated): [B, H_kv, T, D]."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=-2), torch.cat([self.v[layer], v], dim=-2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        self.k = [None if t is None else t[..., :length, :] for t in self.k]
        self.v = [None if t is None else t[..., :length, :] for t in self.v]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only these batch rows (batched decoding drops finished rows)."""
        self.k = [None if t is None else t[index] for t in self.k]
        self.v = [None if t is None else t[index] for t in self.v]

    def drop_left(self, n: int) -> None:
        """Drop the first `n` context columns (left padding no remaining row needs)."""
        if n > 0:
            self.k = [None if t is None else t[..., n:, :] for t in self.k]
            self.v = [None if t is None else t[..., n:, :] for t in self.v]


class DraftAttention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, d] -> k, v: [B, H_kv, T, D]
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return _rope(k, cos, sin), v

    def forward(
        self,
        h,
        ctx,
        cos,
        sin,
        mask=None,
        cache: DraftCache | None = None,
        rows: slice | None = None,
        context_mask: torch.Tensor | None = None,
    ):
        # h: [B, Q, d] normed block states; ctx: [B, C, d] fused context; cos/sin: [B, C+Q, D]
        # rows: queries only at these offsets of every block (keys/values still from all of h) -> [B, Q', d]
        # context_mask: bool [B, C_all] over every context column (cached + new), False = a pad (one block per row)
        B, Q, _ = h.shape
        C = ctx.shape[1]
        hq, cq, sq = h, cos[:, C:], sin[:, C:]
        if rows is not None:
            bs = mask.block_size if isinstance(mask, BlockMask) else Q
            hq, cq, sq = block_rows(h, bs, rows), block_rows(cq, bs, rows), block_rows(sq, bs, rows)
        q = self.q_norm(self.q_proj(hq).view(B, hq.shape[1], self.n_heads, self.head_dim)).transpose(1, 2)
        q = _rope(q, cq, sq)
        k_ctx, v_ctx = self._kv(ctx, cos[:, :C], sin[:, :C])
        if cache is not None:
            k_ctx, v_ctx = cache.append(self.layer_idx, k_ctx, v_ctx)
        k_blk, v_blk = self._kv(h, cos[:, C:], sin[:, C:])
        if isinstance(mask, BlockMask):
            out = _blockwise_attention(q, k_ctx, v_ctx, k_blk, v_blk, mask, rows)
        else:
            k, v = torch.cat([k_ctx, k_blk], dim=-2), torch.cat([v_ctx, v_blk], dim=-2)
            if context_mask is not None:  # key padding: every query of the row sees its real context and the block
                mask = torch.cat([context_mask, context_mask.new_ones(B, Q)], 1)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [B, Q', d]


@dataclass
class BlockMask:
    """Many blocks in one pass: `ctx_visible` [B, 1, Q, C] says which context positions each query sees;
    inside the block every query sees its own block of `block_size` tokens and no other block."""

    ctx_visible: torch.Tensor
    block_size: int


def _blockwise_attention(q, k_ctx, v_ctx, k_blk, v_blk, mask: BlockMask, rows: slice | None = None) -> torch.Tensor:
    """Same result as dense attention under the block mask, at O(Q*C + Q*bs) instead of O(Q*(C+Q)):
    with hundreds of blocks the dense mask would be almost all zeros. With `rows`, q holds only those
    offsets of every block (n of them).
    # q: [B, H, m*n, D]; k/v_ctx: [B, Hkv, C, D]; k/v_blk: [B, Hkv, m*bs, D] -> [B, H, m*n, D]
    """
    B, H, Q, D = q.shape
    Hkv, C, bs = k_ctx.shape[1], k_ctx.shape[2], mask.block_size
    r, m = H // Hkv, k_blk.shape[2] // bs
    n = Q // m  # queries per block
    visible = mask.ctx_visible  # [B|1, 1, m*bs, C]
    if rows is not None:
        visible = block_rows(visible, bs, rows, dim=2)
    qg = q.view(B, Hkv, r, Q, D) * D**-0.5  # query heads grouped by their kv head (GQA without copies)
    s_ctx = qg @ k_ctx[:, :, None].transpose(-1, -2)  # [B, Hkv, r, Q, C]
    s_ctx = s_ctx.masked_fill(~visible[:, :, None], float("-inf"))
    qb = qg.view(B, Hkv, r, m, n, D)
    s_blk = qb @ k_blk.view(B, Hkv, 1, m, bs, D).transpose(-1, -2)  # [B, Hkv, r, m, n, bs]
    p = torch.softmax(torch.cat([s_ctx, s_blk.reshape(B, Hkv, r, Q, bs)], -1).float(), -1).to(q.dtype)
    out = p[..., :C] @ v_ctx[:, :, None]  # [B, Hkv, r, Q, D]
    out = out + (p[..., C:].reshape(B, Hkv, r, m, n, bs) @ v_blk.view(B, Hkv, 1, m, bs, D)).reshape(B, Hkv, r, Q, D)
    return out.reshape(B, H, Q, D)


class DraftLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = DraftAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h, ctx, cos, sin, mask=None, cache=None, rows: slice | None = None, context_mask=None):
        a = self.self_attn(self.input_layernorm(h), ctx, cos, sin, mask, cache, rows, context_mask)
        if rows is not None:  # the residual stream keeps only the rows that were queried
            bs = mask.block_size if isinstance(mask, BlockMask) else h.shape[1]
            h = block_rows(h, bs, rows)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """State-dict keys equal the official `DFlashDraftModel` keys (no prefix, no embeddings, no lm_head)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.layers = nn.ModuleList(DraftLayer(config, i) for i in range(config.num_hidden_layers))
        self.target_layer_ids = list(
            draft_value(config, "target_layer_ids")
            or build_target_layer_ids(config.num_target_layers, config.num_hidden_layers)
        )
        self.block_size = int(draft_value(config, "block_size", 16))
        self.mask_token_id = int(draft_value(config, "mask_token_id"))
        d = config.hidden_size
        self.norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)
        self.fc = nn.Linear(len(self.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)  # buffers only (non-persistent): no state-dict keys
        self.embed_scale = float(draft_value(config, "input_embedding_scale", 1.0))
        self.output_multiplier = float(draft_value(config, "output_multiplier", 1.0))
        self.softcap = draft_value(config, "final_logit_softcapping")
        # aligned readout: context <= anchor (see `context_end`); official dflash ignores the unknown key
        self.context_includes_anchor = bool(draft_value(config, "context_includes_anchor", False))
        self.gradient_checkpointing = False  # recompute each layer in backward (training/TTT of big drafts)

    # -- construction and checkpoints (the work is in `draft_io`) ---------------------------------------
    @classmethod
    def for_target(cls, target, *, seed: int = 0, **shape) -> "DFlashDraft":
        """A freshly initialised draft shaped for `target` (hidden size, heads, vocab, RoPE); `shape`: the keyword
        arguments of `draft_io.config_for_target` (`mask_token_id`, `num_layers`, `block_size`, ...;
        `context_includes_anchor=True` makes it an aligned readout, see `context_end`)."""
        from draftguide.modeling.draft_io import config_for_target

        config = config_for_target(target, **shape)
        torch.manual_seed(seed)
        draft = cls(config)
        draft.init_weights()
        return draft

    def init_weights(self, std: float | None = None) -> None:
        std = std if std is not None else getattr(self.config, "initializer_range", 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Qwen3RMSNorm):
                nn.init.ones_(m.weight)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "DFlashDraft":
        """See `draft_io.load_pretrained`."""
        from draftguide.modeling.draft_io import load_pretrained

        return load_pretrained(path, dtype, device, cls=cls)

    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor], device=None, where: str = "") -> "DFlashDraft":
        """See `draft_io.from_state_dict`."""
        from draftguide.modeling.draft_io import from_state_dict

        return from_state_dict(config, state, device, where, cls=cls)

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """See `draft_io.save_pretrained`."""
        from draftguide.modeling.draft_io import save_pretrained

        save_pretrained(self, path, dtype)

    # -- compatibility with a target ------------------------------------------------------------------
    def check_target(self, target) -> None:
        """Raise a one-line DraftGuideError when this draft cannot read `target`."""
        tc = target.config.get_text_config()
        d, n_layers, vocab = tc.hidden_size, tc.num_hidden_layers, target.get_input_embeddings().weight.shape[0]
        bad = [i for i in self.target_layer_ids if not 0 <= i < n_layers]
        if bad:
            raise DraftGuideError(f"draft target_layer_ids {bad} out of range: the target has {n_layers} layers")
        if self.fc.in_features != len(self.target_layer_ids) * d:
            raise DraftGuideError(
                f"draft fc expects {self.fc.in_features} feature dims but the target gives "
                f"{len(self.target_layer_ids)} layers x {d} = {len(self.target_layer_ids) * d}"
            )
        if self.config.hidden_size != d:
            raise DraftGuideError(f"draft hidden size {self.config.hidden_size} != target hidden size {d}")
        if not 0 <= self.mask_token_id < vocab:
            raise DraftGuideError(
                f"draft mask_token_id {self.mask_token_id} outside the target vocabulary [0, {vocab})"
            )

    def check_speculative(self) -> None:
        """Raise a one-line DraftGuideError when this draft cannot propose blocks (an aligned readout)."""
        if self.context_includes_anchor:
            raise DraftGuideError(
                "this draft is an aligned readout (context_includes_anchor): it reads the anchor's own target "
                "features, which a proposed block's anchor does not have yet; speculative decoding needs a "
                "speculative draft (e.g. smollm2-135m-dflash)"
            )

    # -- forward ----------------------------------------------------------------------------------------
    def embed(self, target, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, Q] -> [B, Q, d]; raw embedding rows (times the configured scale), as the official code does
        w = target.get_input_embeddings().weight
        return F.embedding(ids, w).to(self.fc.weight.dtype) * self.embed_scale

    def forward(
        self,
        noise_embedding: torch.Tensor,  # [B, Q, d] embeddings of [anchor, MASK...] (one or many blocks)
        target_hidden: torch.Tensor,  # [B, C, n*d] raw target features of context positions (C may be 0)
        position_ids: torch.Tensor,  # [B, C+Q] absolute positions of context, then block tokens
        cache: DraftCache | None = None,
        attention_mask: "torch.Tensor | BlockMask | None" = None,  # bool [B|1, 1, Q, C+Q] (True = visible)
        rows: slice | None = None,
        context_mask: torch.Tensor | None = None,  # bool [B, C_all] (True = a real context column)
    ) -> torch.Tensor:  # [B, Q, d] after the final norm ([B, m*n, d] with `rows`)
        """`rows` (a slice of block offsets, e.g. `slice(1, 2)` for the k=1 readout): return only those offsets
        of every block. Same values; the last layer then computes queries, output projection and MLP for those
        rows alone (its keys and values still come from the whole block), which is most of its cost.
        `context_mask` (one block per row, no `attention_mask`; batched decoding with left padding): which of
        the context columns, cached ones first, each row sees; the block itself stays fully visible."""
        if rows is not None and attention_mask is not None and not isinstance(attention_mask, BlockMask):
            raise ValueError("rows needs attention_mask=None (one block) or a BlockMask")
        if context_mask is not None and attention_mask is not None:
            raise ValueError("context_mask goes with attention_mask=None (one block per row)")
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))
        h = noise_embedding
        cos, sin = self.rotary_emb(h, position_ids)
        if cache is not None and attention_mask is not None and not isinstance(attention_mask, BlockMask):
            # a BlockMask may go with a cache: its context columns then cover cached + new context
            raise ValueError("the cached (inference) mode takes no dense attention mask")
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            r = rows if i == last else None
            if recompute:
                h = torch.utils.checkpoint.checkpoint(
                    layer, h, ctx, cos, sin, attention_mask, cache, r, context_mask, use_reentrant=False
                )
            else:
                h = layer(h, ctx, cos, sin, attention_mask, cache, r, context_mask)
        return self.norm(h)

    def context_kv(
        self, target_hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's context K/V (normed, rotated: what `DraftCache` holds) of target features, without running a
        block: context keys and values depend on the features and their positions alone, so a row can join a batch
        with its whole context cached at once. # target_hidden: [B, C, n*d], position_ids: [B, C] -> [(k, v)]"""
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))
        cos, sin = self.rotary_emb(ctx, position_ids)
        return [layer.self_attn._kv(ctx, cos, sin) for layer in self.layers]

    def logits(self, hidden: torch.Tensor, target) -> torch.Tensor:
        # [B, Q, d] -> [B, Q, V] through the target's own output head
        head = getattr(target, "lm_head", None) or target.get_output_embeddings()
        out = head(hidden.to(head.weight.dtype)) * self.output_multiplier
        if self.softcap:
            out = torch.tanh(out / float(self.softcap)) * float(self.softcap)
        return out


# -- many anchors in one pass (mode b) ----------------------------------------------------------------
def context_visible(anchors: torch.Tensor, ctx_len: int, block_size: int, includes_anchor: bool) -> torch.Tensor:
    """Bool [B, 1, m*bs, ctx_len]: every query of block i sees context column c (= position c) iff
    `c < context_end(anchors[:, i])`. # anchors: [B, m] absolute anchor positions"""
    blk = torch.arange(anchors.shape[1], device=anchors.device).repeat_interleave(block_size)  # [m*bs] block ids
    end = context_end(anchors, includes_anchor)[:, blk, None]  # [B, m*bs, 1]
    return (torch.arange(ctx_len, device=anchors.device) < end)[:, None]


def block_attention_mask(
    anchors: torch.Tensor, ctx_len: int, block_size: int, includes_anchor: bool = False
) -> torch.Tensor:
    """Bool mask [B, 1, m*bs, ctx_len + m*bs]: block i sees the context positions `context_end` allows
    (`< anchors[:, i]`, or `<=` for an aligned readout) and its own block, nothing else.
    # anchors: [B, m] absolute anchor positions
    """
    B, m = anchors.shape
    blk = torch.arange(m, device=anchors.device).repeat_interleave(block_size)  # [m*bs] block id of each query
    own = (blk[:, None] == blk[None, :]).expand(B, 1, -1, -1)  # [B, 1, m*bs, m*bs]
    return torch.cat([context_visible(anchors, ctx_len, block_size, includes_anchor), own], dim=-1)


def block_inputs(token_ids: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int):
    """Token ids [B, m*bs] of `[tok[anchor], MASK x (bs-1)]` per block and their positions [B, m*bs].
    # token_ids: [B, T], anchors: [B, m]
    """
    B, m = anchors.shape
    ids = torch.full((B, m, block_size), mask_token_id, dtype=token_ids.dtype, device=token_ids.device)
    ids[:, :, 0] = token_ids.gather(1, anchors)
    pos = anchors[:, :, None] + torch.arange(block_size, device=anchors.device)
    return ids.view(B, -1), pos.view(B, -1)


def multi_block_hidden(
    draft: DFlashDraft, target, features, token_ids, anchors, block_size=None, forward=None, rows: slice | None = None
) -> torch.Tensor:
    """All blocks in one masked forward. Returns draft states [B, m, bs, d]; position k of block i
    predicts `token_ids[:, anchors[:, i] + k]`. `forward` replaces `draft` as the module called (a DDP
    wrapper, say, so that its gradient hooks run). `rows`: only those block offsets -> [B, m, n, d].
    # features: [B, T, n*d], token_ids: [B, T], anchors: [B, m]
    """
    bs = block_size or draft.block_size
    B, T = token_ids.shape
    ids, pos = block_inputs(token_ids, anchors, bs, draft.mask_token_id)
    ctx_pos = torch.arange(T, device=token_ids.device).expand(B, T)
    mask = BlockMask(context_visible(anchors, T, bs, draft.context_includes_anchor), bs)  # [B, 1, m*bs, T]
    kw = {} if rows is None else {"rows": rows}  # custom `forward`s (DDP, test doubles) need not know `rows`
    h = (forward or draft)(draft.embed(target, ids), features, torch.cat([ctx_pos, pos], 1), attention_mask=mask, **kw)
    return h.view(B, anchors.shape[1], -1, h.shape[-1])


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "BlockMask",
    "DFlashDraft",
    "DraftCache",
    "block_attention_mask",
    "block_inputs",
    "block_rows",
    "build_target_layer_ids",
    "context_end",
    "context_visible",
    "count_params",
    "draft_value",
    "multi_block_hidden",
]
