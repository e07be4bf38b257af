"""Test-time training (TTT) of the draft: LoRA adapters fitted on one context before decoding from it.

The draft was trained to imitate the target in general; TTT teaches it to read *this* context's target
features. One target prefill over the context gives the features (reused every step, no further target
passes); each step draws random anchors in the context and trains only the LoRA adapters (peft) on block
prediction of the real next B-1 tokens with the draft training loss of `train.py` (same decay weights).

The LoRA adapter on `fc` sees standardised features. Training divides the target features by a per-dimension
RMS scale before `fc` and folds the scale into `fc`'s weights on save, so a saved draft reads raw features,
a few dimensions of which are ~100x larger than the rest: an adapter on raw features would be badly
conditioned. `ttt_adapt` therefore estimates the scale s from the context's own features (per-dimension
RMS, rounded to a power of two so that dividing by it is exact) and feeds x / s to the adapter's `lora_A`
(an explicit step in front of the adapter; the base `fc` keeps reading x, as W x = (W s)(x / s)):

    fc(x) = W x + scaling * B A (x / s)

Merging and saving fold the scale back (`A / s`), so a merged draft and a saved peft adapter compute exactly
this, with no extra step (`standardize_fc=False`: the adapter reads raw features, as before).

`ttt_adapt` returns an `AdaptedDraft`: a `DFlashDraft` (same forward, attributes and methods, so it runs in
speculative decoding, the diagnostic and guided decoding) whose base weights are the caller's draft's own
tensors, shared, frozen and never written. `reset()` (or leaving a `with` block) removes the adapters and
hands back the base draft; `merged()` gives a plain official-format draft; `save_adapter()` a peft adapter.
"""

from __future__ import annotations

import contextlib
import copy
import random
import resource
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from draftguide.decode.common import now
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.targets import extract_features
from draftguide.training.train import block_loss, loss_weights, sample_anchors

ADAPTER = "default"  # peft adapter name
DEFAULT_MODULES = ("fc", "q_proj", "k_proj", "v_proj")
GRAD_CLIP = 1.0  # as in draft training
EVAL_CHUNK = 64  # anchors per draft pass when measuring the context loss (memory ~ anchors x vocabulary)


@dataclass
class TTTReport:
    """What one `ttt_adapt` call did and cost. Times in seconds; `seconds` covers the training steps only."""

    loss_before: float  # draft loss on the context's evaluation anchors, before (= the base draft)
    loss_after: float
    steps: int
    seconds: float
    prefill_seconds: float | None  # the target prefill that gave the features (None: features were passed in)
    peak_mem_bytes: int
    peak_mem_kind: str  # "cuda_max_allocated" (this call) or "process_max_rss" (whole process, CPU)
    n_context_tokens: int
    eval_seconds: float = 0.0  # measuring loss_before/loss_after
    eval_anchors: int = 0
    acc_before: list[float] = field(default_factory=list)  # top-1 accuracy per block offset k = 1..B-1
    acc_after: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)  # per step, on that step's random anchors
    n_trainable_params: int = 0
    lr: float = 0.0
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    anchors_per_step: int = 0
    block_size: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    autocast_dtype: str | None = None
    standardize_fc: bool = False  # the adapter on fc read standardised features (x / s)
    fc_scale_spread: float | None = None  # max / median of the context's per-dimension feature RMS (conditioning)

    @property
    def prefill_ratio(self) -> float | None:
        """TTT time in units of one target prefill of the same context."""
        return self.seconds / self.prefill_seconds if self.prefill_seconds else None

    def to_dict(self) -> dict:
        return asdict(self) | {"prefill_ratio": self.prefill_ratio}


@dataclass
class TTTConfig:
    """The `ttt_adapt` options a measurement run applies to every context (CLI flags map onto these)."""

    steps: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_MODULES
    anchors_per_step: int = 16
    block_size: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    autocast_dtype: str | None = None
    standardize_fc: bool = True

    def kwargs(self, **override) -> dict:
        return asdict(self) | override

    def validate(self) -> "TTTConfig":
        """Raise a one-line DraftGuideError for a bad option (before any model is loaded)."""
        _check_options(self.steps, self.lr, self.rank, self.anchors_per_step, self.dropout, 1)
        if not self.target_modules:
            raise DraftGuideError("TTT needs at least one target module (e.g. fc)")
        return self


class AdaptedDraft(DFlashDraft):
    """A draft with LoRA adapters on some of its linear layers; build it with `ttt_adapt` or `load_adapter`.

    The adapters live in a peft `PeftModel` wrapped around this module (kept out of its submodules, so
    `parameters()`/`state_dict()` see the draft with its adapter weights, and nothing else)."""

    base: DFlashDraft
    report: TTTReport | None

    @classmethod
    def wrap(cls, base: DFlashDraft, lora_config, seed: int = 0) -> "AdaptedDraft":
        if isinstance(base, AdaptedDraft):
            raise DraftGuideError(
                "this draft already carries TTT adapters: adapt its base draft (`.reset()` returns it)"
            )
        # the base's tensors, not copies: no extra memory, and nothing here can write them (frozen below)
        self = cls.from_state_dict(copy.deepcopy(base.config), base.state_dict())
        self.rotary_emb = base.rotary_emb
        self.requires_grad_(False)
        from peft import PeftModel

        with torch.random.fork_rng(devices=_cuda_devices(base)):
            torch.manual_seed(seed)  # LoRA A init; B starts at zero, so the draft starts exactly unchanged
            try:
                peft_model = PeftModel(self, lora_config, adapter_name=ADAPTER)
            except ValueError as e:  # e.g. target modules not found in the draft
                raise DraftGuideError(f"cannot add LoRA adapters to the draft: {' '.join(str(e).split())[:300]}") from e
        object.__setattr__(self, "_peft", peft_model)  # not a submodule: it holds this module itself
        object.__setattr__(self, "base", base)
        self.report = None
        self.fc_scale, self._fc_hook = None, None
        self.gradient_checkpointing = base.gradient_checkpointing
        return self.to(next(base.parameters()).device).train(base.training)

    # -- ways back and out ------------------------------------------------------------------------------
    def standardize_fc(self, scale: torch.Tensor) -> None:
        """Feed x / scale to the LoRA adapter on `fc` (its `lora_A`), scale [n*d]: the explicit standardising
        step. Powers of two keep the division exact. `merged()` and `save_adapter()` fold it back (A / scale)."""
        fc = self.lora_modules().get("fc")
        if fc is None:
            raise DraftGuideError("standardize_fc needs a LoRA adapter on fc (target_modules without 'fc')")
        if self._fc_hook is not None:
            raise DraftGuideError("the fc adapter already reads standardised features")
        a = fc.lora_A[ADAPTER]
        scale = scale.detach().float().to(a.weight.device)
        if scale.shape != (a.in_features,) or not bool((scale > 0).all()):
            raise DraftGuideError(
                f"the fc feature scale must be {a.in_features} positive numbers, got shape {tuple(scale.shape)}"
            )
        self.fc_scale = scale
        self._fc_hook = a.register_forward_pre_hook(lambda m, args: (args[0] / scale.to(args[0].dtype), *args[1:]))

    @contextlib.contextmanager
    def _fc_scale_folded(self):
        """Inside the block the fc adapter's A holds A / scale and reads raw features (what a plain peft
        adapter computes); restored after (exactly, for a power-of-two scale)."""
        if self._fc_hook is None:
            yield
            return
        a = self.lora_modules()["fc"].lora_A[ADAPTER]
        self._fc_hook.remove()
        with torch.no_grad():
            a.weight.div_(self.fc_scale.to(a.weight.dtype)[None, :])
        try:
            yield
        finally:
            with torch.no_grad():
                a.weight.mul_(self.fc_scale.to(a.weight.dtype)[None, :])
            scale = self.fc_scale
            self._fc_hook = a.register_forward_pre_hook(lambda m, args: (args[0] / scale.to(args[0].dtype), *args[1:]))

    def reset(self) -> DFlashDraft:
        """Remove the adapters (this module becomes a plain copy of the base again) and return the base draft,
        whose weights were never written."""
        if self._fc_hook is not None:
            self._fc_hook.remove()
            self.fc_scale, self._fc_hook = None, None
        if getattr(self, "_peft", None) is not None:
            self._peft.base_model.unload()
            object.__setattr__(self, "_peft", None)
        return self.base

    def __enter__(self) -> "AdaptedDraft":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in self.named_modules() if isinstance(m, LoraLayer)}

    @torch.no_grad()
    def merged(self) -> DFlashDraft:
        """A plain official-format draft (fresh tensors) with the adapters merged into the base weights."""
        state = {k: v.clone() for k, v in self.base.state_dict().items()}
        for name, mod in self.lora_modules().items():
            w, delta = mod.base_layer.weight, mod.get_delta_weight(ADAPTER)  # delta = scaling * B A
            if name == "fc" and self.fc_scale is not None:  # the adapter read x / s: B A diag(1/s) on raw x
                delta = delta / self.fc_scale.to(delta.dtype)[None, :]
            state[f"{name}.weight"] = (w + delta.to(w.dtype)).contiguous()
        out = DFlashDraft.from_state_dict(copy.deepcopy(self.base.config), state)
        return out.requires_grad_(False).eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """The merged draft, official layout (an adapted draft saves as what it computes)."""
        self.merged().save_pretrained(path, dtype)

    def save_adapter(self, path: str | Path) -> None:
        """peft adapter format (`adapter_config.json` + `adapter_model.safetensors`); `load_adapter` reads it."""
        if getattr(self, "_peft", None) is None:
            raise DraftGuideError("the adapters were removed by reset(): nothing to save")
        with self._fc_scale_folded():  # a plain peft adapter on raw features, computing the same
            self._peft.save_pretrained(str(path))
        if self.report is not None:
            from draftguide.reporting.runs import write_json

            write_json(Path(path) / "ttt_report.json", self.report.to_dict())


def load_adapter(draft: DFlashDraft, path: str | Path) -> AdaptedDraft:
    """`draft` with the peft adapter saved in `path` (by `AdaptedDraft.save_adapter`). Every adapter tensor
    must land on a LoRA weight of the draft and every LoRA weight must get one: otherwise a DraftGuideError
    names the unmatched and the missing keys (an adapter saved under other key names would else load as a
    silent no-op, the draft unchanged)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not (Path(path) / "adapter_config.json").is_file():
        raise DraftGuideError(f"'{path}' has no adapter_config.json (not a peft adapter folder)")
    cfg = LoraConfig.from_pretrained(str(path))
    cfg.inference_mode = False
    adapted = AdaptedDraft.wrap(draft, cfg)
    weights = load_peft_weights(str(path), device=str(next(draft.parameters()).device))
    try:
        result = set_peft_model_state_dict(adapted._peft, weights, adapter_name=ADAPTER)
    except RuntimeError as e:  # e.g. a shape mismatch (another rank or draft)
        raise DraftGuideError(f"adapter '{path}' does not fit this draft: {str(e).splitlines()[0]}") from None
    unmatched = sorted(getattr(result, "unexpected_keys", ()) or ())
    missing = sorted(k for k in getattr(result, "missing_keys", ()) or () if ".lora_" in k and f".{ADAPTER}." in k)
    if unmatched or missing or not weights:

        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = (
            [f"{len(unmatched)} adapter tensor(s) match no LoRA weight of the draft: {few(unmatched)}"]
            if unmatched
            else []
        )
        parts += [f"{len(missing)} LoRA weight(s) of the draft get no tensor: {few(missing)}"] if missing else []
        raise DraftGuideError(
            f"adapter '{path}' does not match the draft's LoRA weights ({'; '.join(parts) or 'no tensors'})"
        )
    return adapted.eval()


# -- TTT ----------------------------------------------------------------------------------------------
def ttt_adapt(
    draft: DFlashDraft,
    target,
    context_ids: torch.Tensor,
    *,  # defaults: TTTConfig's, the one place they are set
    steps: int = TTTConfig.steps,
    lr: float = TTTConfig.lr,
    rank: int = TTTConfig.rank,
    alpha: float = TTTConfig.alpha,
    dropout: float = TTTConfig.dropout,
    target_modules: Iterable[str] = TTTConfig.target_modules,
    anchors_per_step: int = TTTConfig.anchors_per_step,
    block_size: int | None = TTTConfig.block_size,
    seed: int = TTTConfig.seed,
    gradient_checkpointing: bool = TTTConfig.gradient_checkpointing,
    autocast_dtype: torch.dtype | str | None = TTTConfig.autocast_dtype,
    standardize_fc: bool = TTTConfig.standardize_fc,
    features: torch.Tensor | None = None,
    eval_anchors: int = 64,
    on_step: Callable[[int, AdaptedDraft], None] | None = None,
    progress: bool = False,
) -> AdaptedDraft:
    """Fit LoRA adapters of `draft` to the context `context_ids` ([1, T] or [T]) and return the adapted draft.

    `features` ([1, T, n*d], the target's features of the context) skips the prefill. `eval_anchors` evenly
    spaced anchors give the context loss before and after. `on_step(step, draft)` is called (draft in eval
    mode) before the first step with step 0 and after every step. Works inside `torch.inference_mode()`.
    `standardize_fc` (with "fc" among the target modules): the fc adapter reads the context features divided
    by their per-dimension RMS (`context_feature_scale`); see the module docstring.
    The target's parameters get no gradients; the base draft's weights are never written."""
    from peft import LoraConfig

    _check_options(steps, lr, rank, anchors_per_step, dropout, eval_anchors)
    draft.check_target(target)
    from draftguide.modeling.prompts import check_length

    dev = next(target.parameters()).device
    ids = _context_ids(context_ids, dev)  # [1, T]
    check_length(target, ids.shape[1], where="TTT context", what="context")
    T, bs = ids.shape[1], block_size or draft.block_size
    if not 2 <= bs:
        raise DraftGuideError(f"block_size must be >= 2, got {bs}")
    amp = _autocast(dev, autocast_dtype)
    with torch.inference_mode(False), torch.enable_grad(), _frozen(target):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        prefill_s = None
        if features is None:
            t0 = now(dev)
            with torch.no_grad():
                out = target(ids, output_hidden_states=True, logits_to_keep=1)
                features = extract_features(out.hidden_states, draft.target_layer_ids)  # [1, T, n*d]
            prefill_s = now(dev) - t0
        features = _check_features(features, ids, draft)
        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules),
            bias="none",
            inference_mode=False,
        )
        adapted = AdaptedDraft.wrap(draft, lora, seed)
        adapted.gradient_checkpointing = gradient_checkpointing
        spread = None
        if standardize_fc and "fc" in adapted.lora_modules():
            scale = context_feature_scale(features)
            adapted.standardize_fc(scale)
            spread = float(scale.max() / scale.median())
        weights = loss_weights(bs).to(dev)
        eval_at = evenly_spaced_anchors(T, eval_anchors)
        t_eval = now(dev)
        before = context_loss(adapted, target, features, ids, eval_at, weights, bs, amp)
        eval_s = now(dev) - t_eval
        params = [p for p in adapted.parameters() if p.requires_grad]
        losses = _train(
            adapted,
            target,
            features,
            ids,
            params,
            weights,
            bs,
            amp,
            steps=steps,
            lr=lr,
            anchors_per_step=anchors_per_step,
            seed=seed,
            on_step=on_step,
            progress=progress,
        )
        t_eval = now(dev)
        after = context_loss(adapted, target, features, ids, eval_at, weights, bs, amp)
        eval_s += now(dev) - t_eval
    peak, kind = _peak_memory(dev)
    adapted.report = TTTReport(
        loss_before=before[0],
        loss_after=after[0],
        steps=steps,
        seconds=losses.seconds,
        prefill_seconds=prefill_s,
        peak_mem_bytes=peak,
        peak_mem_kind=kind,
        n_context_tokens=T,
        eval_seconds=eval_s,
        eval_anchors=len(eval_at),
        acc_before=before[1],
        acc_after=after[1],
        train_losses=losses.values,
        n_trainable_params=sum(p.numel() for p in params),
        lr=lr,
        rank=rank,
        alpha=alpha,
        target_modules=list(target_modules),
        anchors_per_step=anchors_per_step,
        block_size=bs,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        autocast_dtype=None if amp is None else str(amp).removeprefix("torch."),
        standardize_fc=adapted.fc_scale is not None,
        fc_scale_spread=spread,
    )
    return adapted.eval()


@dataclass
class _Losses:
    values: list[float]
    seconds: float


def _train(
    adapted, target, features, ids, params, weights, bs, amp, *, steps, lr, anchors_per_step, seed, on_step, progress
) -> _Losses:
    """`steps` AdamW steps on random context anchors; the global RNGs are left as they were."""
    from tqdm.auto import tqdm

    dev, T = ids.device, ids.shape[1]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    lengths = torch.tensor([T], device=dev)
    values, seconds = [], 0.0
    _callback(on_step, 0, adapted)
    with torch.random.fork_rng(devices=_cuda_devices(adapted)):
        torch.manual_seed(seed)  # LoRA dropout
        for step in tqdm(range(steps), desc="ttt", disable=not progress):
            t0 = now(dev)
            adapted.train()
            anchors = torch.tensor([sample_anchors(1, T, anchors_per_step, rng)], device=dev)  # [1, m]
            with _amp(dev, amp):
                loss, *_ = block_loss(adapted, target, features, ids, anchors, lengths, weights, block_size=bs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            seconds += now(dev) - t0
            values.append(float(loss.detach()))
            _callback(on_step, step + 1, adapted)
    return _Losses(values, seconds)


def _callback(on_step, step: int, adapted: AdaptedDraft) -> None:
    if on_step is None:
        return
    adapted.eval()
    with torch.no_grad():
        on_step(step, adapted)


@torch.no_grad()
def context_loss(
    draft, target, features, ids, anchors: list[int], weights, block_size=None, amp=None
) -> tuple[float, list[float]]:
    """Draft loss and per-offset top-1 accuracy on blocks anchored at `anchors` (weighted by label counts).
    # features: [1, T, n*d], ids: [1, T]"""
    was = draft.training
    draft.eval()
    dev, bs = ids.device, block_size or draft.block_size
    total, hits, count = 0.0, torch.zeros(bs - 1), torch.zeros(bs - 1)
    wsum = 0.0
    for c in range(0, len(anchors), EVAL_CHUNK):
        a = torch.tensor([anchors[c : c + EVAL_CHUNK]], device=dev)
        with _amp(dev, amp):
            loss, acc, n, _ = block_loss(
                draft, target, features, ids, a, torch.tensor([ids.shape[1]], device=dev), weights, block_size=bs
            )
        w = float((weights.cpu() * n.cpu()).sum())  # draft_loss normalises by the weighted label count
        total, wsum = total + float(loss) * w, wsum + w
        hits, count = hits + acc.cpu() * n.cpu(), count + n.cpu()
    draft.train(was)
    return total / max(wsum, 1e-9), (hits / count.clamp_min(1)).tolist()


def context_feature_scale(features: torch.Tensor) -> torch.Tensor:
    """Per-dimension RMS of the features [1, T, n*d] over all positions but the first (as training's
    `FeatureScale`: attention-sink outliers would dominate), rounded to the nearest power of two. -> [n*d]"""
    x = features[:, 1:] if features.shape[1] > 1 else features
    rms = x.reshape(-1, x.shape[-1]).float().pow(2).mean(0).sqrt().clamp_min(1e-6)
    return torch.exp2(torch.log2(rms).round())


def evenly_spaced_anchors(length: int, n: int) -> list[int]:
    """Up to n distinct anchors spread evenly over [1, length-2] (those with a next token to predict)."""
    lo, hi = 1, length - 2
    if hi < lo:
        return []
    if hi - lo + 1 <= n:
        return list(range(lo, hi + 1))
    return sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)}) if n > 1 else [lo]


# -- helpers ------------------------------------------------------------------------------------------
def _check_options(steps, lr, rank, anchors_per_step, dropout, eval_anchors) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise DraftGuideError(f"TTT steps must be an integer >= 0, got {steps!r}")
    if not lr > 0:
        raise DraftGuideError(f"TTT learning rate must be > 0, got {lr!r}")
    if not isinstance(rank, int) or rank < 1:
        raise DraftGuideError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not isinstance(anchors_per_step, int) or anchors_per_step < 1:
        raise DraftGuideError(f"anchors_per_step must be an integer >= 1, got {anchors_per_step!r}")
    if not 0 <= dropout < 1:
        raise DraftGuideError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if eval_anchors < 1:
        raise DraftGuideError(f"eval_anchors must be >= 1, got {eval_anchors!r}")


def _context_ids(context_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(context_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise DraftGuideError(f"context_ids must have shape [1, T] or [T], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise DraftGuideError(f"context_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] < 3:
        raise DraftGuideError(
            f"a context of {ids.shape[1]} tokens is too short for TTT: need at least 3 "
            "(an anchor needs context before it and a token after it)"
        )
    return ids.long().to(device)


def _check_features(features: torch.Tensor, ids: torch.Tensor, draft: DFlashDraft) -> torch.Tensor:
    want = (1, ids.shape[1], draft.fc.in_features)
    if tuple(features.shape) != want:
        raise DraftGuideError(
            f"features must have shape {list(want)} (context x target layers), got {list(features.shape)}"
        )
    # features made under inference_mode cannot be saved for backward: a plain copy can
    return features.detach().clone() if features.is_inference() else features.detach()


def _autocast(device: torch.device, dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    dt = names.get(dtype) if isinstance(dtype, str) else dtype
    if dt not in (torch.bfloat16, torch.float16):
        raise DraftGuideError(f"autocast_dtype must be bfloat16 or float16, got {dtype!r}")
    if device.type == "cpu" and dt is torch.float16:
        raise DraftGuideError("float16 autocast needs a GPU; use bfloat16 on CPU")
    return dt


def _amp(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """No parameter of `module` takes part in autograd inside the block; flags are restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _cuda_devices(module: torch.nn.Module) -> list:
    dev = next(module.parameters()).device
    return [dev] if dev.type == "cuda" else []


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


__all__ = [
    "AdaptedDraft",
    "TTTConfig",
    "TTTReport",
    "context_feature_scale",
    "context_loss",
    "evenly_spaced_anchors",
    "load_adapter",
    "ttt_adapt",
]
