"""The small steps the decoders are built from: block-offset selection, the context rule, and the speculative
loop's accept / commit / stop handling, each against a handmade case or the explicit expression it replaces."""

import pytest
import torch

from conftest import tiny_draft, tiny_target
from draftguide.decode.common import (
    accepted_length,
    commit,
    draft_block,
    read_committed,
    token_buffer,
)
from draftguide.decode.speculative import AcceptanceRates, VerifyPolicy
from draftguide.modeling.draft import DraftCache, block_rows, context_end, context_visible
from draftguide.modeling.targets import extract_features


@pytest.mark.parametrize("rows", [slice(1, 2), slice(1, 4), slice(0, 4), slice(2, None)])
def test_block_rows_equals_the_explicit_expression(rows):
    bs, m = 4, 3
    x = torch.randn(2, m * bs, 5)
    ref = x.unflatten(1, (m, bs))[:, :, rows].flatten(1, 2)
    assert torch.equal(block_rows(x, bs, rows), ref)
    v = torch.rand(2, 1, m * bs, 7) > 0.5  # along dim 2, as the block mask's context columns
    assert torch.equal(block_rows(v, bs, rows, dim=2), v.unflatten(2, (m, bs))[:, :, :, rows].flatten(2, 3))


def test_context_end_for_both_rules():
    anchors = torch.tensor([[3, 7]])
    assert context_end(anchors, False).tolist() == [[3, 7]]  # speculative draft: positions < anchor
    assert context_end(anchors, True).tolist() == [[4, 8]]  # aligned readout: positions <= anchor
    assert context_end(5, False) == 5 and context_end(5, True) == 6  # plain ints too (decoding loops)


@pytest.mark.parametrize("aligned", [False, True])
def test_context_visible_follows_context_end(aligned):
    anchors, C, bs = torch.tensor([[2, 5], [0, 3]]), 8, 3
    vis = context_visible(anchors, C, bs, aligned)  # [B, 1, m*bs, C]
    assert vis.shape == (2, 1, 2 * bs, C)
    for b in range(2):
        for i in range(2):
            end = int(anchors[b, i]) + aligned
            for k in range(bs):
                assert vis[b, 0, i * bs + k].tolist() == [c < end for c in range(C)]


def test_accepted_length_on_handmade_proposals():
    chosen = torch.tensor([4, 9, 2, 6])  # the verifier's choice after the anchor and after each proposal
    assert accepted_length(torch.tensor([4, 9, 2]), chosen) == 3  # all accepted: the bonus is chosen[3]
    assert accepted_length(torch.tensor([4, 1, 2]), chosen) == 1  # stops at the first mismatch...
    assert accepted_length(torch.tensor([5, 9, 2]), chosen) == 0  # ...even when later ones would agree


def test_commit_writes_accepted_then_the_next_token_and_respects_max_len():
    buf = token_buffer(torch.tensor([[1, 2, 3]]), max_new_tokens=6, block_size=4, fill=0)
    assert buf.tolist() == [[1, 2, 3] + [0] * 10]
    buf[0, 3] = 7  # the anchor at position 3
    produced = commit(buf, 3, torch.tensor([11, 12, 13]), 2, torch.tensor(20), max_len=9)
    assert produced == 3 and buf[0, 3:8].tolist() == [7, 11, 12, 20, 0]
    # near the end: 3 tokens written, only the 1 before max_len counts
    assert commit(buf, 7, torch.tensor([31, 32, 33]), 2, torch.tensor(40), max_len=9) == 1


def test_read_committed_cuts_after_the_first_stop_token():
    buf = torch.tensor([[0, 5, 6, 7, 6, 9]])
    assert read_committed(buf, 1, 4, set()) == ([5, 6, 7, 6], False)
    assert read_committed(buf, 1, 4, {6, 9}) == ([5, 6], True)
    assert read_committed(buf, 1, 2, {9}) == ([5, 6], False)  # a stop token past the committed ones is not read


def test_verify_policy_fixed_and_adaptive():
    fixed = VerifyPolicy(3)
    assert fixed.rows_to_read(8) == 4 and fixed.rows_to_read(2) == 2  # anchor + n_verify, cut at the block end
    assert fixed.verify_len(torch.zeros(3, 10), 4, 8, 0.0) == 4
    costs = [1.0] * 9
    assert VerifyPolicy(3, costs).rows_to_read(8) == 8  # adaptive without read costs reads the whole block
    assert VerifyPolicy(3, costs).rows_to_read(2) == 2  # a 2-token block is never adaptive
    sure = torch.full((7, 10), -30.0)
    sure[:, 0] = 30.0  # a confident draft at every offset and flat costs: verify all 7
    assert VerifyPolicy(3, costs).verify_len(sure, 8, 8, 0.0) == 8
    seen = AcceptanceRates(7)
    policy = VerifyPolicy(3, costs, [0.0] * 7, seen)
    policy.update(1, 3)  # offsets 0 and 1 reached, 0 accepted
    assert seen.tries[:3] == [2.0, 2.0, 1.0] and seen.hits[:3] == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("aligned", [False, True])
def test_draft_block_reads_context_up_to_context_end(aligned):
    """`draft_block` equals the draft called with the explicit positions: context end-C..end-1, then the block."""
    target = tiny_target()
    draft = tiny_draft(target)
    draft.context_includes_anchor = aligned
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
    start, B = 9, draft.block_size
    end = start + aligned
    block = torch.full((1, B), draft.mask_token_id)
    block[0, 0] = ids[0, start]
    cache = DraftCache(len(draft.layers))
    draft(draft.embed(target, block), feats[:, :4], torch.arange(4 + B)[None], cache=cache)  # context < 4 cached
    got = draft_block(target, draft, cache, feats[:, 4:end], block, start, rows=slice(1, 4))
    pos = torch.cat([torch.arange(end), torch.arange(start, start + B)])[None]
    ref = draft(draft.embed(target, block), feats[:, :end], pos, rows=slice(1, 4))
    assert got.shape == (1, 3, target.config.hidden_size) and len(cache) == end
    torch.testing.assert_close(got, ref)
