"""Drafts on disk and by name: the official checkpoint layout (`config.json` + `model.safetensors`, key names
equal to z-lab's `DFlashDraftModel`), configs for fresh drafts, and the names `--draft` takes (a folder, a
shipped draft's name, `init[:N]`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, build_target_layer_ids, draft_value

WEIGHTS_NAME = "model.safetensors"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # drafts shipped with the package, by name


# -- configs ------------------------------------------------------------------------------------------
def config_for_target(
    target,
    *,
    mask_token_id: int,
    num_layers: int = 1,
    block_size: int = 16,
    target_layer_ids: list[int] | None = None,
    intermediate_size: int | None = None,
    context_includes_anchor: bool = False,
) -> Qwen3Config:
    """The config of a draft shaped for `target` (hidden size, heads, vocab, RoPE), in the official layout;
    `context_includes_anchor=True` makes it an aligned readout (see `draft.context_end`)."""
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
    return config


def config_from_dict(raw: dict, where) -> Qwen3Config:
    """A draft config from a `config.json` dict (official or ours). Raises DraftGuideError naming `where` when
    it does not build or lacks the mask token or the target layers."""
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


# -- checkpoints ----------------------------------------------------------------------------------------
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


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu", cls: type[DFlashDraft] = DFlashDraft
) -> DFlashDraft:
    """Load an official-layout folder (`config.json` + `model.safetensors`, or sharded with an index) as a
    `cls`, in eval mode. Raises DraftGuideError for a missing or corrupt config or weights."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DraftGuideError(f"draft folder '{path}' has no config.json")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DraftGuideError(f"corrupt draft config '{cfg_file}': {e}") from e
    config = config_from_dict(raw, cfg_file)
    state = {}
    for f in _weight_files(path):
        try:
            state.update(load_file(f, device=str(device)))
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise DraftGuideError(f"corrupt draft weights '{f}': {str(e).splitlines()[0]}") from e
    draft = from_state_dict(config, state, device=device, where=f"in '{path}'", cls=cls)
    if dtype is not None:
        draft.to(dtype)
    return draft.eval()


def from_state_dict(
    config, state: dict[str, torch.Tensor], device=None, where: str = "", cls: type[DFlashDraft] = DFlashDraft
) -> DFlashDraft:
    """A `cls` that takes the tensors of `state` as its weights, without copying (they share storage).
    Raises DraftGuideError when the keys or shapes do not match `config`."""
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


def save_pretrained(draft: DFlashDraft, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the official layout: `config.json` + `model.safetensors` (no prefix), atomically per file."""
    from safetensors.torch import save_file

    from draftguide.reporting.runs import dumps

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in draft.state_dict().items()}
    cfg = draft.config.to_dict()
    cfg["architectures"] = ["DFlashDraftModel"]
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_NAME)
    (path / "config.json.tmp").write_text(dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(path / "config.json.tmp", path / "config.json")


# -- names ------------------------------------------------------------------------------------------------
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
    draft = load_pretrained(path, dtype=dtype, device=device)
    if target is not None:
        draft.check_target(target)
    return draft


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
    print(msg, file=sys.stderr)


def is_aligned_readout(spec: str | os.PathLike | None) -> bool:
    """Whether a draft folder (or shipped name) is an aligned readout, from its config alone (no weights
    loaded); `init[:N]` and missing folders are not."""
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


__all__ = [
    "MODELS_DIR",
    "PURPOSES",
    "SHIPPED_DRAFTS",
    "SHIPPED_READOUTS",
    "WEIGHTS_NAME",
    "check_speculative_spec",
    "config_for_target",
    "config_from_dict",
    "default_mask_token_id",
    "draft_path",
    "from_state_dict",
    "is_aligned_readout",
    "load_draft",
    "load_pretrained",
    "resolve_draft",
    "save_pretrained",
    "shipped_draft",
]
