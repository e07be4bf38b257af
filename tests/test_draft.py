"""The draft model on its own: layer choice, the two forward modes, save/load, input validation."""

import json

import pytest
import torch

from conftest import tiny_draft, tiny_target
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import (
    DFlashDraft,
    DraftCache,
    block_attention_mask,
    build_target_layer_ids,
    multi_block_hidden,
)
from draftguide.modeling.draft_io import load_draft
from draftguide.modeling.targets import extract_features


def test_build_target_layer_ids_matches_official():
    from dflash.model import build_target_layer_ids as official

    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    for L in (6, 18, 30, 36, 64):
        for n in (1, 2, 3, 5):
            assert build_target_layer_ids(L, n) == official(L, n)


def test_block_mask_sees_strictly_earlier_context_and_own_block():
    m = block_attention_mask(torch.tensor([[3, 5]]), ctx_len=8, block_size=2)[0, 0]  # [4, 8 + 4]
    ctx, blk = m[:, :8], m[:, 8:]
    assert ctx[0].tolist() == [True] * 3 + [False] * 5  # anchor 3 sees 0..2, not its own position
    assert ctx[2].tolist() == [True] * 5 + [False] * 3
    assert blk.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def _features(target, ids):
    out = target(ids, output_hidden_states=True)
    return out.hidden_states


def test_multi_anchor_pass_equals_inference_blocks(qwen3_pair):
    """Mode (b), all anchors in one masked pass, must agree with mode (a), one cached block per anchor."""
    target, draft = qwen3_pair
    ids = torch.randint(0, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    feats = extract_features(_features(target, ids), draft.target_layer_ids)
    anchors = torch.tensor([[5, 17, 30]])
    with torch.no_grad():
        multi = multi_block_hidden(draft, target, feats, ids, anchors)  # [1, 3, B, d]
        B = draft.block_size
        for i, a in enumerate(anchors[0].tolist()):
            cache = DraftCache(len(draft.layers))
            # context arrives in two chunks, as it does during decoding
            draft(draft.embed(target, ids[:, :2]), feats[:, : a // 2], torch.arange(a // 2 + 2)[None], cache=cache)
            block = torch.full((1, B), draft.mask_token_id)
            block[0, 0] = ids[0, a]
            pos = torch.arange(a // 2, a + B)[None]
            single = draft(draft.embed(target, block), feats[:, a // 2 : a], pos, cache=cache)
            assert len(cache) == a  # only context is cached, never the block
            torch.testing.assert_close(multi[0, i], single[0], atol=1e-5, rtol=1e-5)


def test_feature_of_anchor_position_cannot_leak(qwen3_pair):
    """Changing features at or after the anchor leaves the block's output unchanged."""
    target, draft = qwen3_pair
    ids = torch.randint(0, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    feats = extract_features(_features(target, ids), draft.target_layer_ids)
    anchors = torch.tensor([[12]])
    with torch.no_grad():
        a = multi_block_hidden(draft, target, feats, ids, anchors)
        f2 = feats.clone()
        f2[:, 12:] += torch.randn_like(f2[:, 12:])
        b = multi_block_hidden(draft, target, f2, ids, anchors)
        f3 = feats.clone()
        f3[:, 11] += 1.0
        c = multi_block_hidden(draft, target, f3, ids, anchors)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # ...while the last visible position does matter


def test_save_load_roundtrip_exact(tmp_path, qwen3_pair):
    target, draft = qwen3_pair
    draft.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["block_size"] == draft.block_size and cfg["num_target_layers"] == 6
    assert cfg["dflash_config"] == {"mask_token_id": draft.mask_token_id, "target_layer_ids": [1, 3, 4]}
    again = load_draft(tmp_path, target)
    for k, v in draft.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_bf16_save_loads_in_bf16(tmp_path, qwen3_pair):
    _, draft = qwen3_pair
    draft.save_pretrained(tmp_path, dtype=torch.bfloat16)
    again = DFlashDraft.from_pretrained(tmp_path)
    assert again.fc.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target_layer_ids=[1, 3, 6]), "out of range"),
        (dict(mask_token_id=500), "outside the target vocabulary"),
    ],
)
def test_check_target_rejects_mismatch(change, message):
    target = tiny_target()
    kw = dict(
        num_layers=1,
        block_size=4,
        mask_token_id=change.get("mask_token_id", 5),
        target_layer_ids=change.get("target_layer_ids", [1, 2]),
    )
    draft = DFlashDraft.for_target(target, **kw)
    with pytest.raises(DraftGuideError, match=message):
        draft.check_target(target)


def test_check_target_rejects_feature_width():
    draft = tiny_draft(tiny_target())  # 3 feature layers x 64
    other = tiny_target()
    draft.target_layer_ids = [1, 2]  # the config now claims 2 x 64 while fc reads 3 x 64
    with pytest.raises(DraftGuideError, match="fc expects 192"):
        draft.check_target(other)


def test_load_errors(tmp_path, qwen3_pair):
    target, draft = qwen3_pair
    with pytest.raises(DraftGuideError, match="does not exist"):
        load_draft(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftGuideError, match="no config.json"):
        load_draft(tmp_path / "empty")
    good = tmp_path / "good"
    draft.save_pretrained(good)
    (good / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DraftGuideError, match="corrupt draft weights"):
        load_draft(good)
    draft.save_pretrained(good)
    (good / "config.json").write_text("{not json")
    with pytest.raises(DraftGuideError, match="corrupt draft config"):
        load_draft(good)
    draft.save_pretrained(good)
    (good / "model.safetensors").unlink()
    with pytest.raises(DraftGuideError, match="no model.safetensors"):
        load_draft(good)
    draft.save_pretrained(good)
    cfg = json.loads((good / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["layer_types"] = 3, ["full_attention"] * 3  # weights hold 2 layers
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftGuideError, match="do not match its config"):
        load_draft(good)
    cfg["num_hidden_layers"], cfg["layer_types"], cfg["intermediate_size"] = 2, ["full_attention"] * 2, 100
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftGuideError, match="has shape"):
        load_draft(good)
    cfg["intermediate_size"], cfg["dflash_config"] = 128, {"target_layer_ids": [1, 3, 4]}
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftGuideError, match="mask_token_id"):
        load_draft(good)


def test_blockwise_attention_equals_dense_block_mask(qwen3_pair):
    """The multi-anchor fast path gives what dense attention under `block_attention_mask` gives."""
    from draftguide.modeling.draft import block_inputs

    target, draft = qwen3_pair
    ids = torch.randint(0, 90, (2, 30), generator=torch.Generator().manual_seed(2))
    feats = extract_features(_features(target, ids), draft.target_layer_ids)
    anchors = torch.tensor([[0, 4, 20], [3, 9, 28]])
    with torch.no_grad():
        fast = multi_block_hidden(draft, target, feats, ids, anchors)
        bids, pos = block_inputs(ids, anchors, draft.block_size, draft.mask_token_id)
        dense_mask = block_attention_mask(anchors, 30, draft.block_size)
        dense = draft(
            draft.embed(target, bids),
            feats,
            torch.cat([torch.arange(30).expand(2, 30), pos], 1),
            attention_mask=dense_mask,
        )
    torch.testing.assert_close(fast, dense.view_as(fast), atol=1e-5, rtol=1e-5)


def test_rows_return_the_same_states_for_fewer_queries(qwen3_pair):
    """`rows` (block offsets the caller reads) only skips work: the states equal those rows of the full pass,
    in the cached single-block mode and in the multi-anchor mode, and a dense mask is refused."""
    from draftguide.modeling.draft import BlockMask, block_inputs

    target, draft = qwen3_pair
    B = draft.block_size
    ids = torch.randint(0, 90, (2, 30), generator=torch.Generator().manual_seed(3))
    feats = extract_features(_features(target, ids), draft.target_layer_ids)
    with torch.no_grad():
        block = torch.full((1, B), draft.mask_token_id)
        block[0, 0] = ids[0, 20]
        pos = torch.arange(20 + B)[None]
        full = draft(draft.embed(target, block), feats[:1, :20], pos, cache=DraftCache(len(draft.layers)))
        for rows in (slice(1, 2), slice(1, B), slice(2, 4)):
            part = draft(
                draft.embed(target, block), feats[:1, :20], pos, cache=DraftCache(len(draft.layers)), rows=rows
            )
            assert part.shape[1] == len(range(B)[rows])
            torch.testing.assert_close(part, full[:, rows], atol=1e-5, rtol=1e-5)

        anchors = torch.tensor([[0, 4, 20], [3, 9, 28]])
        multi = multi_block_hidden(draft, target, feats, ids, anchors)  # [2, 3, B, d]
        bids, bpos = block_inputs(ids, anchors, B, draft.mask_token_id)
        blk = torch.arange(3).repeat_interleave(B)
        mask = BlockMask((torch.arange(30)[None, None, :] < anchors[:, blk, None])[:, None], B)
        k1 = draft(
            draft.embed(target, bids),
            feats,
            torch.cat([torch.arange(30).expand(2, 30), bpos], 1),
            attention_mask=mask,
            rows=slice(1, 2),
        )  # [2, 3, d]
        torch.testing.assert_close(k1, multi[:, :, 1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="rows"):
            draft(
                draft.embed(target, bids),
                feats,
                torch.cat([torch.arange(30).expand(2, 30), bpos], 1),
                attention_mask=block_attention_mask(anchors, 30, B),
                rows=slice(1, 2),
            )
