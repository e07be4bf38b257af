"""draftguide: read a language model through a deep DFlash readout and use it to decode better."""

__version__ = "0.1.0"

from .draft import DFlashDraft, build_target_layer_ids, load_draft, multi_block_hidden  # noqa: E402
from .errors import DraftGuideError  # noqa: E402
from .speculative import greedy_generate, run_speculate, speculative_generate  # noqa: E402
from .targets import extract_features, load_target  # noqa: E402

# Heavier entry points (training, evaluation, the diagnostic with its plotting) load on first use.
_LAZY = {
    "TrainConfig": "train", "train_draft": "train", "draft_from_checkpoint": "train",
    "make_data": "data",
    "build_tasks": "tasks", "load_builtin_tasks": "tasks",
    "run_eval": "evaluate", "register_method": "evaluate",
    "run_diagnose": "report", "score_sequence": "diagnostic",
    "DraftGuide": "pipeline", "run_profile": "profiling", "write_report": "paper", "create_app": "server",
    "ttt_adapt": "ttt", "AdaptedDraft": "ttt", "TTTReport": "ttt",
    "guided_generate": "guided", "power_sample": "baselines", "dola_generate": "baselines",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DFlashDraft",
    "DraftGuideError",
    "build_target_layer_ids",
    "extract_features",
    "greedy_generate",
    "load_draft",
    "load_target",
    "multi_block_hidden",
    "run_speculate",
    "speculative_generate",
    *_LAZY,
]
