"""Draft training, the DFlash recipe: frozen target, many anchors per sequence in one masked pass.

Per sequence, up to N anchors are drawn uniformly from the last prompt position and the response positions
(so the first response token is a label); block i holds `[tok[a_i], MASK x (B-1)]` and position k is
trained to predict `tok[a_i + k]` (no shift), seeing target features of the positions `draft.context_end`
allows (`< a_i`; `<= a_i` for an aligned readout). Loss = sum_k w_k L_k / sum_k w_k,
w_k = exp(-(k-1)/gamma), with L_k one of (`TrainConfig.loss`):
- `ce`: cross-entropy with the text's token (the DFlash paper's recipe);
- `kd`: distillation, the soft cross-entropy `-sum_v p_T(v) log p_D(v)` (temperature tau, times tau^2) from the
  target's own next-token distribution for the same token, i.e. at position `a_i + k - 1`, read from the
  teacher-forced target forward that also gives the features (no extra target pass). EAGLE-family drafts
  train on the target's distribution; equal to CE when the teacher is one-hot;
- `mix`: `(1 - kd_weight) * ce + kd_weight * kd`.
AdamW, linear warmup then cosine, grad clip 1.0. Embeddings and lm_head are the target's (frozen).
On a CPU with bf16 matrix units, `autocast` runs the target and draft forwards in bf16 (fp32 master weights).

Speed tricks that leave the saved draft a plain official-format draft over the full vocabulary:
- features are standardised per dimension before `fc` (SmolLM2 has a few huge-magnitude dims);
  the scale is folded into `fc` when saving;
- the loss may run over a vocabulary subset (the most frequent response tokens), labels outside it
  ignored; only the cross-entropy sees the subset.

Runs unchanged under `torchrun --nproc_per_node N` (DDP; gloo on CPU, NCCL on GPU): each rank takes a
disjoint shard of every batch; rank 0 writes checkpoints and logs.

This module holds the recipe (config, loss, build, one step, export) and `train_draft`, the loop;
`trainer.py` the recipe-free machinery it runs on (state, LR schedule, time budget, data order, checkpoints).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, build_target_layer_ids, multi_block_hidden
from draftguide.modeling.draft_io import default_mask_token_id
from draftguide.modeling.targets import extract_features
from draftguide.reporting.runs import JsonlWriter, write_json
from draftguide.training.data import read_samples
from draftguide.training.trainer import (
    LogWindow,
    StopOnSignal,
    TimeBudget,
    TrainState,
    dist_rank_world,
    lr_schedule,
    rank_batch,
    restore_checkpoint,
    save_checkpoint,
)

IGNORE = -100


@dataclass
class TrainConfig:
    block_size: int | None = None  # None: 16 for a fresh draft, the --init-from draft's own otherwise
    draft_layers: int = 3
    target_layer_ids: list[int] | None = None
    anchors_per_seq: int = 64
    batch_size: int = 8  # sequences per optimizer step (over all ranks)
    max_len: int = 768  # sequences are cut to this many tokens
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float | None = None  # loss decay; default 7 for B=16, scaled with B
    vocab_subset: int | None = 16384  # None = full vocabulary in the loss
    normalize_features: bool = True
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    mask_token_id: int | None = None
    save_dtype: str = "bfloat16"  # dtype of the final official-layout draft
    time_budget_s: float | None = None  # fit the schedule (warmup + cosine to 0) into this much wall time
    tf32: bool = True  # TF32 matmuls on CUDA (training only; features differ from fp32 by ~1e-3 relative)
    loss: str = "ce"  # ce | kd | mix (see the module docstring)
    kd_weight: float = 0.5  # share of the KD term in `mix`
    kd_temperature: float = 1.0
    context_includes_anchor: bool = False  # train an aligned readout (draft.context_end)
    init_from: str | None = (
        None  # an official-layout draft folder to start from (its shape wins over draft_layers etc.)
    )
    autocast: bool = False  # bf16 autocast of the target and draft forwards (fp32 master weights)
    first_token: bool = True  # anchors may sit on the last prompt position: the first response token is a label
    train_offsets: int | None = None  # train block offsets 1..N only (None: all B-1)

    def validate(self) -> "TrainConfig":
        if self.loss not in LOSSES:
            raise DraftGuideError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise DraftGuideError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if self.train_offsets is not None and not 1 <= self.train_offsets:
            raise DraftGuideError(f"--train-offsets must be >= 1, got {self.train_offsets}")
        if not self.kd_temperature > 0 or not math.isfinite(self.kd_temperature):
            raise DraftGuideError(f"--kd-temperature must be a positive number, got {self.kd_temperature}")
        return self


LOSSES = ("ce", "kd", "mix")


def loss_weights(block_size: int, gamma: float | None = None) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 1..B-1; gamma 7 for B = 16."""
    gamma = gamma or 7.0 * block_size / 16
    k = torch.arange(1, block_size, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def sample_anchors(prompt_len: int, length: int, n: int, rng: random.Random, first_token: bool = True) -> list[int]:
    """Up to n distinct anchors that have at least one response token after them: the response positions and,
    with `first_token`, the last prompt position (whose block predicts the first response token, as every
    decode step right after a prompt asks)."""
    lo, hi = max(prompt_len - int(first_token), 1), length - 2  # a+1 must exist
    if hi < lo:
        return []
    pool = range(lo, hi + 1)
    return sorted(rng.sample(pool, min(n, len(pool))))


def block_labels(ids: torch.Tensor, anchors: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """Labels [B, m, bs-1]: position k of block i gets `ids[a_i + k]` (no shift); past the end: IGNORE.
    # ids: [B, T], anchors: [B, m] (-1 = padding anchor), lengths: [B]
    """
    k = torch.arange(1, block_size, device=ids.device)
    pos = anchors[:, :, None] + k  # [B, m, bs-1]
    valid = (anchors[:, :, None] >= 0) & (pos < lengths[:, None, None])
    lab = ids.gather(1, pos.clamp(0, ids.shape[1] - 1).view(ids.shape[0], -1)).view(pos.shape)
    return lab.masked_fill(~valid, IGNORE)


def draft_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Weighted CE over block offsets. logits [B, m, bs-1, V'], labels [B, m, bs-1], weights [bs-1].
    Returns (loss, per-offset accuracy [bs-1], per-offset label count [bs-1])."""
    ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none").view(
        labels.shape
    )
    valid = labels != IGNORE
    w = weights.to(ce.device)[None, None, :] * valid
    loss = (ce * w).sum() / w.sum().clamp_min(1e-9)
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels) & valid
        n = valid.sum((0, 1))
        acc = hit.sum((0, 1)) / n.clamp_min(1)
    return loss, acc, n


def kd_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Weighted soft cross-entropy `-sum_v p_T(v) log softmax(logits / tau)(v)`, times tau^2 (Hinton et al. 2015),
    averaged like `draft_loss`; equals its CE when `teacher_probs` is one-hot at tau 1.
    # logits: [B, m, bs-1, V'], teacher_probs: same (already softened by tau), valid: [B, m, bs-1], weights: [bs-1]"""
    logq = torch.log_softmax(logits.float() / temperature, -1)
    soft = -(teacher_probs * logq).sum(-1) * temperature**2  # [B, m, bs-1]
    w = weights.to(soft.device)[None, None, :] * valid
    return (soft.masked_fill(~valid, 0.0) * w).sum() / w.sum().clamp_min(1e-9)


def teacher_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """Positions [B, m, bs-1] whose target next-token distribution teaches block offset k = 1..bs-1: the token
    `anchor + k` is predicted by the target at `anchor + k - 1`. # anchors: [B, m]"""
    return anchors[:, :, None] + torch.arange(block_size - 1, device=anchors.device)


def block_loss(
    draft,
    target,
    features,
    ids,
    anchors,
    lengths,
    weights,
    *,
    block_size=None,
    head=None,
    remap=None,
    forward=None,
    teacher_states=None,
    loss: str = "ce",
    kd_weight: float = 0.5,
    kd_temperature: float = 1.0,
    offsets: int | None = None,
):
    """The DFlash loss of the blocks anchored at `anchors` (-1 = padding) in one masked draft pass.
    `head` [V', d] replaces the draft's own logits (`draft.logits`, full vocabulary) by a vocabulary subset
    and `remap` maps full-vocabulary label ids into it. `teacher_states` [B, T, d]: the target's final
    (normed) hidden states, needed for `loss` kd/mix; the teacher logits go through the same head.
    `offsets` (1..bs-1, default all): train only block offsets 1..offsets (the last draft layer then computes
    only those rows; an aligned readout that serves k=1 reads needs no more).
    Returns (loss, acc [K], n [K], agree [K]); agree = top-1 agreement with the teacher (NaN without one).
    # features: [B, T, n*d], ids: [B, T], anchors: [B, m], lengths: [B]"""
    bs = block_size or draft.block_size
    K = offsets or bs - 1
    labels = block_labels(ids, anchors, lengths, bs)[..., :K]  # [B, m, K]
    weights = weights[:K]
    valid = labels != IGNORE  # position-valid (before the subset remap)
    rows = slice(1, K + 1) if K < bs - 1 else None
    hidden = multi_block_hidden(draft, target, features, ids, anchors.clamp_min(0), bs, forward=forward, rows=rows)
    hidden = hidden[:, :, -K:]  # [B, m, K, d]
    project = (lambda h: draft.logits(h, target)) if head is None else (lambda h: h @ head.T.to(h.dtype))
    logits = project(hidden)  # [B, m, K, V']
    if remap is not None:
        labels = remap[labels.clamp_min(0)].masked_fill(labels == IGNORE, IGNORE)
    ce, acc, n = draft_loss(logits, labels, weights)
    agree = torch.full_like(acc, float("nan"))
    if loss == "ce" and teacher_states is None:
        return ce, acc, n, agree
    if teacher_states is None:
        raise ValueError(f"loss '{loss}' needs teacher_states")
    pos = teacher_positions(anchors.clamp_min(0), bs)[..., :K].clamp_max(teacher_states.shape[1] - 1)
    with torch.no_grad():
        t_h = teacher_states.gather(1, pos.flatten(1)[..., None].expand(-1, -1, teacher_states.shape[-1]))
        t_logits = project(t_h.view(*pos.shape, -1).to(hidden.dtype)).float()  # [B, m, bs-1, V']
        teacher = torch.softmax(t_logits / kd_temperature, -1)
        hit = (logits.argmax(-1) == t_logits.argmax(-1)) & valid
        agree = hit.sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)
    if loss == "ce":
        return ce, acc, n, agree
    kd = kd_loss(logits, teacher, valid, weights, kd_temperature)
    total = kd if loss == "kd" else (1 - kd_weight) * ce + kd_weight * kd
    return total, acc, n, agree


class FeatureScale(torch.nn.Module):
    """Per-dimension feature scale applied before `fc` in training; folded into `fc` when saving."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> None:
        # RMS per dim over all positions but the first (attention-sink outliers would dominate)
        x = feats[:, 1:].reshape(-1, feats.shape[-1]).float()
        self.scale.copy_(x.pow(2).mean(0).sqrt().clamp_min(1e-6))

    def forward(self, feats):
        return feats / self.scale.to(feats.dtype)


def fold_scale_into_fc(draft: DFlashDraft, scale: torch.Tensor) -> DFlashDraft:
    """fc(x / s) == (W diag(1/s)) x: returns a plain draft that reads raw target features."""
    with torch.no_grad():
        draft.fc.weight.div_(scale.to(draft.fc.weight)[None, :])
    return draft


def draft_from_checkpoint(path: str | Path) -> DFlashDraft:
    """The plain draft (feature scale folded into fc) from a training checkpoint, e.g. mid-run."""
    blob = torch.load(path, map_location="cpu", weights_only=False)  # our own training checkpoint
    from draftguide.modeling.draft_io import config_from_dict

    if "config" not in blob:
        raise DraftGuideError(f"checkpoint '{path}' has no draft config (written by an older draftguide)")
    draft = DFlashDraft(config_from_dict(blob["config"], path))
    draft.load_state_dict(blob["draft"])
    return fold_scale_into_fc(draft, blob["scale"]["scale"]).eval()


def vocab_subset(samples: list[dict], size: int | None, vocab: int) -> torch.Tensor | None:
    """The `size` most frequent response tokens (sorted ids), or None for the full vocabulary."""
    if size is None or size >= vocab:
        return None
    resp = np.concatenate([np.asarray(s["input_ids"][s["prompt_len"] :], dtype=np.int64) for s in samples])
    counts = np.bincount(resp, minlength=vocab)
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.as_tensor(np.sort(top))


# -- build -----------------------------------------------------------------------------------------
def initial_draft(target, tokenizer, cfg: TrainConfig) -> DFlashDraft:
    """A fresh draft shaped by `cfg`, or a copy of `cfg.init_from` (its shape and mask token; the readout kind
    follows `cfg.context_includes_anchor`, so a speculative draft can seed an aligned readout). fp32."""
    if cfg.init_from:
        from draftguide.modeling.draft_io import load_draft

        src = load_draft(cfg.init_from, dtype=torch.float32)
        config = src.config
        config.dflash_config = dict(getattr(config, "dflash_config", None) or {})
        config.dflash_config.pop("context_includes_anchor", None)
        if cfg.context_includes_anchor:
            config.dflash_config["context_includes_anchor"] = True
        if cfg.block_size:  # a block-16 draft generalises down, not up (DFlash paper ablation)
            config.block_size = cfg.block_size
            config.dflash_config.pop("block_size", None)
        draft = DFlashDraft(config)
        draft.load_state_dict(src.state_dict())
        return draft
    tc = target.config.get_text_config()
    mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token_id(tokenizer)
    return DFlashDraft.for_target(
        target,
        num_layers=cfg.draft_layers,
        block_size=cfg.block_size or 16,
        mask_token_id=mask_id,
        target_layer_ids=cfg.target_layer_ids or build_target_layer_ids(tc.num_hidden_layers, 5),
        seed=cfg.seed,
        context_includes_anchor=cfg.context_includes_anchor,
    )


def usable_samples(data_dir) -> list[dict]:
    """The make-data samples with at least 2 response tokens. Raises DraftGuideError when there are none."""
    samples = [s for s in read_samples(data_dir) if len(s["input_ids"]) - s["prompt_len"] >= 2]
    if not samples:
        raise DraftGuideError(f"no usable samples in '{data_dir}' (each needs >= 2 response tokens)")
    return samples


def nominal_total(cfg: TrainConfig, n_samples: int) -> int:
    """Optimizer steps of `cfg.steps`, else of `cfg.epochs` over `n_samples` (at least 1)."""
    steps_per_epoch = max(1, n_samples // cfg.batch_size)
    return cfg.steps or max(1, int(cfg.epochs * steps_per_epoch))


def subset_head(target, subset: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss's frozen head and label map for a vocabulary subset (sorted ids, or None for all):
    head [V', d] = the target's lm_head rows of the subset; remap [V] = full-vocabulary id -> subset index,
    IGNORE outside it (None without a subset)."""
    head_w = target.get_output_embeddings().weight  # [V, d]
    if subset is None:
        return head_w, None
    subset = subset.to(dev)
    remap = torch.full((head_w.shape[0],), IGNORE, dtype=torch.long, device=dev)
    remap[subset] = torch.arange(len(subset), device=dev)
    return head_w[subset], remap


@dataclass
class TrainRun:
    """What a training run steps: the draft (fp32 weights) and the module its forward goes through (the draft, or
    its DDP wrapper under torchrun), the feature scale, optimizer, LR schedule, and the loss's fixed inputs."""

    draft: DFlashDraft
    model: torch.nn.Module
    scale: FeatureScale
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    head: torch.Tensor  # [V', d] frozen
    remap: torch.Tensor | None  # [V] -> [0, V') or IGNORE
    weights: torch.Tensor  # [bs-1] loss weight per block offset
    n_offsets: int  # block offsets with a loss (K)
    dev: torch.device

    def checkpointed(self) -> dict:
        """The objects `save_checkpoint` / `restore_checkpoint` take, by keyword."""
        return {"draft": self.draft, "scale": self.scale, "opt": self.opt, "sched": self.sched}


def build_run(target, tokenizer, samples: list[dict], cfg: TrainConfig, state: TrainState, world: int = 1) -> TrainRun:
    """A fresh draft (or `cfg.init_from`'s) on the target's device, in training mode, with an identity feature
    scale, AdamW and the warmup + cosine schedule over `state.total` (read at every step). Sets `cfg.block_size`
    to the draft's. Raises DraftGuideError when the draft does not fit the target."""
    draft = initial_draft(target, tokenizer, cfg)
    draft.check_target(target)
    cfg.block_size = draft.block_size  # an --init-from draft sets the shape
    dev = next(target.parameters()).device
    draft.to(dev).train()
    scale = FeatureScale(draft.fc.in_features).to(dev)
    subset = vocab_subset(samples, cfg.vocab_subset, target.get_output_embeddings().weight.shape[0])
    head, remap = subset_head(target, subset, dev)
    weights = loss_weights(cfg.block_size, cfg.gamma).to(dev)
    if dev.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = draft
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(draft, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    n_offsets = min(cfg.train_offsets or cfg.block_size - 1, cfg.block_size - 1)
    sched = lr_schedule(opt, state, cfg.warmup_ratio)
    return TrainRun(draft, model, scale, params, opt, sched, head, remap, weights, n_offsets, dev)


def _collate(batch: list[dict], max_len: int, pad: int):
    L = min(max_len, max(len(s["input_ids"]) for s in batch))
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    lengths = torch.zeros(len(batch), dtype=torch.long)
    for i, s in enumerate(batch):
        x = s["input_ids"][:L]
        ids[i, : len(x)] = torch.as_tensor(x)
        lengths[i] = len(x)
    return ids, lengths


def _anchor_tensor(batch, lengths, n, rng, first_token: bool = True) -> torch.Tensor:
    lists = [sample_anchors(s["prompt_len"], int(lengths[i]), n, rng, first_token) for i, s in enumerate(batch)]
    m = max(1, max(len(a) for a in lists))
    out = torch.full((len(batch), m), -1, dtype=torch.long)
    for i, a in enumerate(lists):
        out[i, : len(a)] = torch.as_tensor(a, dtype=torch.long)
    return out


@torch.no_grad()
def fit_feature_scale(run: TrainRun, feats: torch.Tensor, cfg: TrainConfig, world: int = 1) -> None:
    """Fit the feature scale on the first batch's features [b, T, n*d] (identity without
    `cfg.normalize_features`); rank 0's scale on every rank. An `init_from` draft's fc reads raw features:
    W diag(s) reads scaled ones alike."""
    if cfg.normalize_features:
        run.scale.fit(feats)
    if world > 1:  # all ranks must agree on the scale
        import torch.distributed as dist

        dist.broadcast(run.scale.scale, 0)
    if cfg.init_from:
        run.draft.fc.weight.mul_(run.scale.scale.to(run.draft.fc.weight)[None, :])


class StepStats(NamedTuple):
    loss: torch.Tensor  # [] detached, before the update
    acc: torch.Tensor  # [K] top-1 accuracy per block offset
    n: torch.Tensor  # [K] labels per block offset
    agree: torch.Tensor  # [K] top-1 agreement with the target
    grad_norm: torch.Tensor  # [] before clipping


def train_step(
    run: TrainRun,
    target,
    batch: list[dict],
    cfg: TrainConfig,
    state: TrainState,
    *,
    pad: int = 0,
    world: int = 1,
    rng=random,
) -> StepStats:
    """One optimizer step on this rank's `batch` (make-data samples): the frozen target's features (fitting the
    feature scale on the training's first batch, which sets `state.scale_fitted`), anchors drawn with `rng`, the
    masked draft pass and loss, backward, grad clip, AdamW and schedule steps."""
    ids, lengths = _collate(batch, cfg.max_len, pad)
    ids, lengths = ids.to(run.dev), lengths.to(run.dev)  # [b, T], [b]
    amp = torch.autocast(run.dev.type, dtype=torch.bfloat16, enabled=cfg.autocast)
    with torch.no_grad(), amp:
        hs = target(
            ids,
            attention_mask=(torch.arange(ids.shape[1], device=run.dev) < lengths[:, None]).long(),
            output_hidden_states=True,
            logits_to_keep=1,
        ).hidden_states
        feats = extract_features(hs, run.draft.target_layer_ids)  # [b, T, n*d]
        if not state.scale_fitted:
            fit_feature_scale(run, feats, cfg, world)
            state.scale_fitted = True
    anchors = _anchor_tensor(batch, lengths.cpu(), cfg.anchors_per_seq, rng, cfg.first_token).to(run.dev)  # [b, m]
    with amp:
        loss, acc, n, agree = block_loss(
            run.draft,
            target,
            run.scale(feats),
            ids,
            anchors,
            lengths,
            run.weights,
            block_size=cfg.block_size,
            head=run.head,
            remap=run.remap,
            forward=run.model,
            teacher_states=hs[-1],
            loss=cfg.loss,
            kd_weight=cfg.kd_weight,
            kd_temperature=cfg.kd_temperature,
            offsets=cfg.train_offsets and min(cfg.train_offsets, cfg.block_size - 1),
        )
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    return StepStats(loss.detach(), acc, n, agree, grad_norm)


def export_draft(draft: DFlashDraft, scale: FeatureScale, folder: Path, dtype: torch.dtype) -> Path:
    """Save a copy of `draft` with the feature scale folded into fc: an official-layout draft folder that reads raw
    target features (`load_draft` loads it). The training draft is left as it is."""
    final = DFlashDraft(draft.config)
    final.load_state_dict(draft.state_dict())
    fold_scale_into_fc(final, scale.scale.cpu())
    final.save_pretrained(folder, dtype=dtype)
    return folder


def write_train_config(out_dir: Path, cfg: TrainConfig, data_dir, n_samples: int, total: int, world: int) -> None:
    """`out_dir/train_config.json`: the config plus the data, sample count, planned total steps and world size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"data": str(data_dir), "n_samples": n_samples, "total_steps": total, "world_size": world}
    write_json(out_dir / "train_config.json", asdict(cfg) | extra)


def train_draft(
    target,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    max_seconds: float | None = None,
) -> dict:
    """Train (or resume) a draft for `target` on `make-data` samples. Writes `out_dir/checkpoint.pt`
    (resumable state), `out_dir/log.jsonl`, and the final official-layout draft in `out_dir/draft/`.
    Stops at the planned total, after `max_seconds`, or on SIGINT/SIGTERM (saving a checkpoint either way).
    Returns {step, total_steps, finished, elapsed_s, draft (folder), model (the training draft)}.
    Raises DraftGuideError on no usable samples, a batch size not divisible by the world size, or a bad config."""
    rank, world = dist_rank_world()
    out_dir = Path(out_dir)
    samples = usable_samples(data_dir)
    if cfg.batch_size % world:
        raise DraftGuideError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {world}")
    cfg.validate()
    total = nominal_total(cfg, len(samples))
    state = TrainState(seed=cfg.seed, total=total)
    run = build_run(target, tokenizer, samples, cfg, state, world)
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.is_file():
        restore_checkpoint(ckpt, **run.checkpointed(), state=state, dev=run.dev)
        if not (state.planned and cfg.time_budget_s):  # a resumed run may change --steps/--epochs
            state.total = total
    else:  # fresh: a run started with --resume and no checkpoint is the same run as one without it
        if resume and rank == 0:
            print(f"draftguide: no checkpoint in {out_dir}; starting fresh")
        random.seed(cfg.seed)
    if rank == 0:
        write_train_config(out_dir, cfg, data_dir, len(samples), state.total, world)

    def checkpoint():  # rank 0 writes for all
        if rank == 0:
            save_checkpoint(ckpt, **run.checkpointed(), state=state, cfg=asdict(cfg))

    log = JsonlWriter(out_dir / "log.jsonl") if rank == 0 else None
    bar = tqdm(total=state.total, initial=state.step, desc="train-draft", disable=not progress or rank != 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t_start = time.perf_counter()
    budget = TimeBudget(cfg.time_budget_s, total, t_start) if cfg.time_budget_s else None
    window = LogWindow(run.n_offsets, t_start)
    with StopOnSignal(enabled=rank == 0 or world == 1) as stop:
        try:
            while state.step < state.total and not stop.requested:
                idx = rank_batch(state, len(samples), cfg.batch_size, cfg.seed, rank, world)
                out = train_step(run, target, [samples[i] for i in idx], cfg, state, pad=pad, world=world)
                state.step += 1
                state.pos += cfg.batch_size
                state.labels_seen += int(out.n.sum()) * world
                window.add(float(out.loss), out.acc, out.agree, out.n)
                bar.update(1)
                if budget and budget.step_done(state, time.perf_counter(), run.dev, world):
                    bar.total = state.total
                    if rank == 0:
                        write_train_config(out_dir, cfg, data_dir, len(samples), state.total, world)
                if state.step % cfg.log_every == 0 or state.step == state.total:
                    now = time.perf_counter()
                    lr = run.sched.get_last_lr()[0]
                    row = window.row(
                        state, lr=lr, grad_norm=float(out.grad_norm), world=world, now=now, t_start=t_start
                    )
                    if log:
                        log.write(row)
                    acc = row["acc"]
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc1=acc[0], acc2=acc[1] if len(acc) > 1 else 0)
                    window = LogWindow(run.n_offsets, now)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    checkpoint()
                if max_seconds and time.perf_counter() - t_start > max_seconds:
                    break
        finally:
            state.elapsed_s += time.perf_counter() - t_start
            bar.close()
            checkpoint()
            if log:
                log.close()
    if rank == 0:
        export_draft(run.draft, run.scale, out_dir / "draft", getattr(torch, cfg.save_dtype))
    return {
        "step": state.step,
        "total_steps": state.total,
        "finished": state.step >= state.total,
        "elapsed_s": state.elapsed_s,
        "draft": str(out_dir / "draft"),
        "model": run.draft,
    }
