"""draftguide: read a language model through a deep DFlash readout and use it to decode better."""

__version__ = "0.1.0"

from .draft import DFlashDraft, build_target_layer_ids, load_draft, multi_block_hidden  # noqa: E402
from .errors import DraftGuideError  # noqa: E402
from .speculative import greedy_generate, speculative_generate  # noqa: E402
from .targets import extract_features, load_target  # noqa: E402

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
]
