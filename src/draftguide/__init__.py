"""draftguide: read a language model through a deep DFlash readout and use it to decode better."""

__version__ = "0.1.0"

from draftguide.decode.speculative import greedy_generate, speculative_generate  # noqa: E402
from draftguide.errors import DraftGuideError  # noqa: E402
from draftguide.modeling.draft import DFlashDraft, build_target_layer_ids, multi_block_hidden  # noqa: E402
from draftguide.modeling.draft_io import load_draft  # noqa: E402
from draftguide.modeling.targets import extract_features, load_target  # noqa: E402

# Heavier entry points (training, evaluation, the diagnostic with its plotting) load on first use.
_LAZY = {
    "TrainConfig": "training.train",
    "train_draft": "training.train",
    "draft_from_checkpoint": "training.train",
    "make_data": "training.data",
    "build_tasks": "experiments.tasks",
    "load_builtin_tasks": "experiments.tasks",
    "run_eval": "experiments.evaluate",
    "register_method": "experiments.evaluate",
    "run_diagnose": "experiments.diagnose",
    "score_sequence": "experiments.diagnostic",
    "DraftGuide": "app.pipeline",
    "run_profile": "experiments.profiling",
    "run_speculate": "experiments.speculate",
    "write_report": "reporting.report",
    "create_app": "app.server",
    "ttt_adapt": "training.ttt",
    "AdaptedDraft": "training.ttt",
    "TTTReport": "training.ttt",
    "guided_generate": "decode.guided",
    "power_sample": "decode.baselines",
    "dola_generate": "decode.baselines",
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
    "speculative_generate",
    *_LAZY,
]
