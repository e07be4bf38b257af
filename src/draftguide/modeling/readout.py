"""Teacher-forced readout logits at answer positions: which draft blocks to run and which offsets to read.

A readout is a `DFlashDraft` (speculative draft or aligned readout) or any object with `read_logits`.
Used by the diagnostic (gold-token scores), guided decoding (trajectories for the shuffled-readout null)
and fidelity."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import multi_block_hidden

MODES = ("next", "block")


MAX_ANCHORS = 256  # anchors per draft forward; longer answers take a few (memory grows with anchors x context)


# -- reading a readout -----------------------------------------------------------------------------------
def block_reads(
    n_answer: int, block_size: int, modes: Iterable[str]
) -> tuple[list[int], dict[str, tuple[list[int], list[int]]]]:
    """Which anchors one draft forward needs and, per mode, which (block, offset) to read for each answer
    token j = 0..A-1. Anchors are indices into the answer's predecessors (anchor i sits at position P-1+i).
    Returns (anchors, {mode: (block index into anchors per j, offset k per j)})."""
    step = block_size - 1
    need: set[int] = set()
    reads = {}
    for mode in modes:
        if mode == "next":
            anchors, ks = list(range(n_answer)), [1] * n_answer
        elif mode == "block":
            anchors, ks = [j - j % step for j in range(n_answer)], [j % step + 1 for j in range(n_answer)]
        else:
            raise DraftGuideError(f"unknown mode {mode!r} (expected {', '.join(MODES)})")
        need.update(anchors)
        reads[mode] = (anchors, ks)
    order = sorted(need)
    where = {a: i for i, a in enumerate(order)}
    return order, {m: ([where[a] for a in anchors], ks) for m, (anchors, ks) in reads.items()}


def readout_logits(
    readout, target, features, ids, n_prompt: int, modes: Iterable[str]
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Per mode: the readout's logits for every answer token [A, V] and the block offset k each was read at.
    A readout with `read_logits` (same arguments, same answer) is asked directly: the seam for readouts that
    are not DFlash drafts. # features: [1, T, n*d], ids: [1, T]"""
    modes = list(modes)
    if hasattr(readout, "read_logits"):
        return readout.read_logits(target, features, ids, n_prompt, modes)
    A = ids.shape[1] - n_prompt
    anchors, reads = block_reads(A, readout.block_size, modes)
    hidden = []
    for c in range(0, len(anchors), MAX_ANCHORS):
        pos = torch.tensor([[n_prompt - 1 + a for a in anchors[c : c + MAX_ANCHORS]]], device=ids.device)
        hidden.append(multi_block_hidden(readout, target, features, ids, pos)[0])  # [m, B, d]
    h = torch.cat(hidden)
    out = {}
    for mode, (blocks, ks) in reads.items():
        rows = h[torch.tensor(blocks, device=h.device), torch.tensor(ks, device=h.device)]  # [A, d]
        out[mode] = (readout.logits(rows[None], target)[0], ks)
    return out
