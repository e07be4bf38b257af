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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from draftguide.errors import DraftGuideError

WEIGHTS_NAME = "model.safetensors"


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


def context_end(anchors: torch.Tensor, includes_anchor: bool) -> torch.Tensor:
    """THE context rule of a readout, in one place: a block anchored at position `a` sees the target features
    of positions `< context_end`, i.e. `< a` for a speculative DFlash draft (the anchor is a token just
    committed: the target has not run it yet, so its features do not exist) and `<= a` for the *aligned
    readout* (`dflash_config.context_includes_anchor`), whose k=1 prediction then sees exactly the positions
    whose last-layer state the target's `lm_head` reads for the same token.
    # anchors: any shape of absolute positions -> same shape (exclusive end)"""
    return anchors + int(bool(includes_anchor))


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
            pick = lambda x: x.unflatten(1, (Q // bs, bs))[:, :, rows].flatten(1, 2)  # noqa: E731
            hq, cq, sq = pick(h), pick(cq), pick(sq)
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
        visible = visible.unflatten(2, (m, bs))[:, :, :, rows].flatten(2, 3)
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
            h = h.unflatten(1, (h.shape[1] // bs, bs))[:, :, rows].flatten(1, 2)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """State-dict keys equal the official `DFlashDraftModel` keys (no prefix, no embeddings, no lm_head)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        _check_config(config)
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

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def for_target(
        cls,
        target,
        *,
        num_layers: int = 1,
        block_size: int = 16,
        mask_token_id: int,
        target_layer_ids: list[int] | None = None,
        intermediate_size: int | None = None,
        context_includes_anchor: bool = False,
        seed: int = 0,
    ) -> "DFlashDraft":
        """A freshly initialised draft shaped for `target` (hidden size, heads, vocab, RoPE);
        `context_includes_anchor=True` makes it an aligned readout (see `context_end`)."""
        tc = target.config.get_text_config()
        n_tl = tc.num_hidden_layers
        ids = list(target_layer_ids or build_target_layer_ids(n_tl, max(num_layers, 1)))
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        rope = getattr(tc, "rope_parameters", None) or {
            "rope_type": "default",
            "rope_theta": getattr(tc, "rope_theta", 1e4),
        }
        config = Qwen3Config(
            hidden_size=tc.hidden_size,
            intermediate_size=intermediate_size or tc.intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=tc.vocab_size,
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(tc, "max_position_embeddings", 8192),
            rope_parameters=dict(rope),
            attention_bias=False,
            tie_word_embeddings=False,
        )
        config.architectures = ["DFlashDraftModel"]
        config.block_size = block_size
        config.num_target_layers = n_tl
        config.dflash_config = {"mask_token_id": int(mask_token_id), "target_layer_ids": ids}
        if context_includes_anchor:
            config.dflash_config["context_includes_anchor"] = True
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
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> "DFlashDraft":
        """Load an official-layout folder (`config.json` + `model.safetensors`, or sharded with an index)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise DraftGuideError(f"draft folder '{path}' has no config.json")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DraftGuideError(f"corrupt draft config '{cfg_file}': {e}") from e
        config = _config_from_dict(raw, cfg_file)
        files = _weight_files(path)
        state = {}
        for f in files:
            try:
                state.update(load_file(f, device=str(device)))
            except Exception as e:  # safetensors raises its own error types for truncated/garbled files
                raise DraftGuideError(f"corrupt draft weights '{f}': {str(e).splitlines()[0]}") from e
        draft = cls.from_state_dict(config, state, device=device, where=f"in '{path}'")
        if dtype is not None:
            draft.to(dtype)
        return draft.eval()

    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor], device=None, where: str = "") -> "DFlashDraft":
        """A draft that takes the tensors of `state` as its weights, without copying (they share storage)."""
        with torch.device("meta"):
            draft = cls(config)
        device = device or (next(iter(state.values())).device if state else "cpu")
        with torch.device(device):
            draft.rotary_emb = Qwen3RotaryEmbedding(config)  # non-persistent buffers: build for real
        ours = dict(draft.state_dict())
        missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        if missing or unexpected:
            raise DraftGuideError(
                f"draft weights {where} do not match its config: missing "
                f"{missing[:4]}{'...' if len(missing) > 4 else ''}, "
                f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
            )
        for k, v in state.items():
            if v.shape != ours[k].shape:
                raise DraftGuideError(
                    f"draft weight '{k}' has shape {tuple(v.shape)}, config implies {tuple(ours[k].shape)}"
                )
        draft.load_state_dict(state, assign=True)
        return draft

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the official layout: `config.json` + `model.safetensors` (no prefix), atomically per file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.state_dict().items()}
        cfg = self.config.to_dict()
        cfg["architectures"] = ["DFlashDraftModel"]
        cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_NAME)
        from draftguide.reporting.runs import dumps

        (path / "config.json.tmp").write_text(dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.replace(path / "config.json.tmp", path / "config.json")

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
def block_attention_mask(
    anchors: torch.Tensor, ctx_len: int, block_size: int, includes_anchor: bool = False
) -> torch.Tensor:
    """Bool mask [B, 1, m*bs, ctx_len + m*bs]: block i sees the context positions `context_end` allows
    (`< anchors[:, i]`, or `<=` for an aligned readout) and its own block, nothing else.
    # anchors: [B, m] absolute anchor positions
    """
    B, m = anchors.shape
    dev = anchors.device
    blk = torch.arange(m, device=dev).repeat_interleave(block_size)  # [m*bs] block id of each query
    end = context_end(anchors, includes_anchor)
    ctx_vis = torch.arange(ctx_len, device=dev)[None, None, :] < end[:, blk, None]  # [B, m*bs, C]
    own = (blk[:, None] == blk[None, :]).expand(B, -1, -1)  # [B, m*bs, m*bs]
    return torch.cat([ctx_vis, own], dim=-1)[:, None]


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
    blk = torch.arange(anchors.shape[1], device=anchors.device).repeat_interleave(bs)  # block id per query
    end = context_end(anchors, draft.context_includes_anchor)  # [B, m]
    mask = BlockMask(torch.arange(T, device=anchors.device)[None, None, :] < end[:, blk, None], bs)
    mask.ctx_visible = mask.ctx_visible[:, None]  # [B, 1, m*bs, T]
    kw = {} if rows is None else {"rows": rows}  # custom `forward`s (DDP, test doubles) need not know `rows`
    h = (forward or draft)(draft.embed(target, ids), features, torch.cat([ctx_pos, pos], 1), attention_mask=mask, **kw)
    return h.view(B, anchors.shape[1], -1, h.shape[-1])


# -- config handling --------------------------------------------------------------------------------
def _config_from_dict(raw: dict, where) -> Qwen3Config:
    raw = dict(raw)
    for key in ("architectures", "auto_map", "model_type", "transformers_version"):
        raw.pop(key, None)
    try:
        config = Qwen3Config(**raw)
    except Exception as e:
        raise DraftGuideError(f"unusable draft config '{where}': {' '.join(str(e).split())[:300]}") from e
    if draft_value(config, "mask_token_id") is None:
        raise DraftGuideError(f"draft config '{where}' has no dflash_config.mask_token_id")
    if draft_value(config, "target_layer_ids") is None and getattr(config, "num_target_layers", None) is None:
        raise DraftGuideError(
            f"draft config '{where}' has neither dflash_config.target_layer_ids nor num_target_layers"
        )
    return config


def _check_config(config) -> None:
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise DraftGuideError(f"draft layer types {sorted(set(types))} not supported (only full_attention)")
    if draft_value(config, "conv_kernel_size") is not None:
        raise DraftGuideError("DFlash2 drafts (conv + candidate selector) are not supported")


def _weight_files(path: Path) -> list[Path]:
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = path / (WEIGHTS_NAME + ".index.json")
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise DraftGuideError(f"corrupt weight index '{index}'") from e
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise DraftGuideError(f"draft weight shard '{f}' is missing")
        return files
    raise DraftGuideError(f"draft folder '{path}' has no {WEIGHTS_NAME} (only safetensors weights are loaded)")


MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # drafts shipped with the package, by name


def draft_path(spec: str | os.PathLike) -> Path:
    """A shipped draft's name (e.g. `smollm2-135m-dflash`, `smollm2-135m-readout`) -> its folder; else `spec`."""
    named = MODELS_DIR / str(spec)
    if str(spec) and "/" not in str(spec) and not Path(spec).exists() and (named / "config.json").is_file():
        return named
    return Path(spec)


def load_draft(path: str | os.PathLike, target=None, dtype: torch.dtype | None = None, device="cpu") -> DFlashDraft:
    """Load a draft folder (or a shipped draft by name, see `draft_path`) and, given a target, check that the
    two fit together. By default the draft takes the target's dtype and device (a bf16 checkpoint next to an
    fp32 CPU target runs in fp32)."""
    path = draft_path(path)
    if not Path(path).exists():
        raise DraftGuideError(f"draft folder '{path}' does not exist")
    if target is not None:
        p = next(target.parameters())
        dtype, device = dtype or p.dtype, p.device if device == "cpu" else device
    draft = DFlashDraft.from_pretrained(path, dtype=dtype, device=device)
    if target is not None:
        draft.check_target(target)
    return draft


def default_mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else the last special token that is not bos/eos/pad/unk and does not
    appear in the chat template (for SmolLM2: `<empty_output>`, id 16, never produced in chat)."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = tokenizer.chat_template or ""
    candidates = [
        i
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if t.special and i not in reserved and t.content not in template
    ]
    if not candidates:
        raise DraftGuideError("cannot pick a mask token for this tokenizer: pass a draft whose config names one")
    return max(candidates)


def resolve_draft(spec: str | None, target, tokenizer, target_name: str | None = None) -> DFlashDraft:
    """`spec`: a draft folder; `init` / `init:N` for a fresh N-layer draft (untrained: tau ~ 1);
    None for the draft shipped with the target (when there is one)."""
    if spec is None:
        shipped = SHIPPED_DRAFTS.get(str(target_name))
        if shipped is None or not shipped.is_dir():
            raise DraftGuideError(
                f"no shipped draft for target '{target_name}': pass --draft PATH (or --draft init for an untrained one)"
            )
        spec = str(shipped)
    if spec == "init" or spec.startswith("init:"):
        try:
            layers = int(spec.split(":", 1)[1]) if ":" in spec else 1
        except ValueError as e:
            raise DraftGuideError(f"--draft {spec}: expected init or init:LAYERS") from e
        return DFlashDraft.for_target(target, num_layers=layers, mask_token_id=default_mask_token_id(tokenizer)).eval()
    return load_draft(spec, target)


# Drafts committed with the project, by target alias (the folder may be absent in a stripped install).
SHIPPED_DRAFTS: dict[str, Path] = {
    "smollm2-135m": MODELS_DIR / "smollm2-135m-dflash",
}
# Aligned readouts (context_includes_anchor) shipped for guidance: they read the same state as the target's
# lm_head. Speculative decoding keeps the speculative draft above (a readout cannot draft ahead).
SHIPPED_READOUTS: dict[str, Path] = {
    "smollm2-135m": MODELS_DIR / "smollm2-135m-readout",
}
PURPOSES = ("speculative", "guidance")


def shipped_draft(target_name: str | None, purpose: str = "speculative", notice=None) -> Path | None:
    """The draft shipped for `target_name` for a purpose: `speculative` -> the speculative draft; `guidance` ->
    the aligned readout when its folder is there, else the speculative draft (with a one-line `notice`, by
    default printed to stderr). None when nothing is shipped for the target."""
    if purpose not in PURPOSES:
        raise DraftGuideError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    spec = SHIPPED_DRAFTS.get(str(target_name))
    spec = spec if spec is not None and spec.is_dir() else None
    if purpose == "guidance":
        readout = SHIPPED_READOUTS.get(str(target_name))
        if readout is not None and (readout / "config.json").is_file():
            return readout
        if readout is not None and spec is not None:
            (notice or _stderr)(
                f"draftguide: note: the aligned readout '{readout.name}' is not shipped in this install; "
                f"guiding with the speculative draft '{spec.name}'"
            )
    return spec


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def is_aligned_readout(spec: str | os.PathLike | None) -> bool:
    """Whether a draft folder (or shipped name) is an aligned readout, from its config alone (no weights
    loaded); `init[:N]` and missing folders are not."""
    import json

    if spec is None or str(spec).startswith("init"):
        return False
    cfg = draft_path(spec) / "config.json"
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return bool(
        (raw.get("dflash_config") or {}).get("context_includes_anchor", raw.get("context_includes_anchor", False))
    )


def check_speculative_spec(spec: str | os.PathLike | None) -> None:
    """`DFlashDraft.check_speculative` from the folder's config, before any model is loaded."""
    if is_aligned_readout(spec):
        raise DraftGuideError(
            f"'{spec}' is an aligned readout (context_includes_anchor): it reads the anchor's own target features, "
            "which a proposed block's anchor does not have yet, so it cannot draft ahead; speculative decoding "
            "(and exact speculative guided decoding) needs a speculative draft, e.g. smollm2-135m-dflash"
        )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "DFlashDraft",
    "DraftCache",
    "block_attention_mask",
    "block_inputs",
    "build_target_layer_ids",
    "context_end",
    "count_params",
    "draft_value",
    "load_draft",
    "resolve_draft",
    "multi_block_hidden",
    "SHIPPED_DRAFTS",
    "SHIPPED_READOUTS",
    "check_speculative_spec",
    "is_aligned_readout",
    "shipped_draft",
]
