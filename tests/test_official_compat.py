"""Compatibility with the official `dflash==0.1.0` package (installed with --no-deps in the test env)."""

import json
import time
from pathlib import Path

import dflash.model as official
import pytest
import torch

from conftest import mixed_acceptance_pair
from draftguide.decode.speculative import speculative_generate
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.draft_io import config_from_dict
from draftguide.modeling.targets import extract_features

FIXTURES = Path(__file__).parent / "fixtures"

# dflash_generate times itself with torch.cuda.synchronize(); make that a plain clock on CPU.
official._cuda_time = time.perf_counter


def _official_from(draft: DFlashDraft) -> official.DFlashDraftModel:
    ref = official.DFlashDraftModel(draft.config).eval()
    ref.load_state_dict(draft.state_dict(), strict=True)
    return ref


def test_key_set_and_shapes_equal_official(qwen3_pair):
    _, draft = qwen3_pair
    ref = official.DFlashDraftModel(draft.config)
    ours = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


def test_qwen3_8b_dflash_b16_config_loads_unchanged():
    """The published z-lab/Qwen3-8B-DFlash-b16 config: same keys and shapes as the official class builds
    (both on the meta device, no weights needed): 58 tensors, ~1.05 B parameters."""
    raw = json.loads((FIXTURES / "qwen3-8b-dflash-b16-config.json").read_text())
    config = config_from_dict(raw, "fixture")
    with torch.device("meta"):
        ours = DFlashDraft(config)
        ref = official.DFlashDraftModel(config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(shapes) == 58
    assert ours.target_layer_ids == [1, 9, 17, 25, 33] and ours.mask_token_id == 151669 and ours.block_size == 16
    n = sum(p.numel() for p in ours.parameters())
    assert 1.0e9 < n < 1.1e9
    assert shapes["fc.weight"] == (4096, 5 * 4096)


def _inputs(target, draft, T=20, Q=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (1, T), generator=g)
    Q = Q or draft.block_size
    feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
    block = torch.full((1, Q), draft.mask_token_id)
    block[0, 0] = ids[0, -1]
    emb = draft.embed(target, block)
    return feats, emb, torch.arange(T + Q)[None]


@torch.no_grad()
def test_outputs_equal_official_within_1e5(qwen3_pair):
    target, draft = qwen3_pair
    ref = _official_from(draft)
    feats, emb, pos = _inputs(target, draft)
    ours = draft(emb, feats, pos)
    theirs = ref(position_ids=pos, noise_embedding=emb, target_hidden=feats)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    head = target.lm_head
    torch.testing.assert_close(draft.logits(ours, target), ref.compute_logits(theirs, head), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_cached_outputs_equal_official(qwen3_pair):
    """Context fed in two steps through each side's cache gives the same block output."""
    from draftguide.modeling.draft import DraftCache

    target, draft = qwen3_pair
    ref = _official_from(draft)
    feats, emb, _ = _inputs(target, draft, T=20)
    cache, rcache = DraftCache(len(draft.layers)), official._make_cache(draft.config)
    first = torch.full((1, draft.block_size), draft.mask_token_id)
    femb = draft.embed(target, first)
    draft(femb, feats[:, :12], torch.arange(12 + draft.block_size)[None], cache=cache)
    ref(
        position_ids=torch.arange(12 + draft.block_size)[None],
        noise_embedding=femb,
        target_hidden=feats[:, :12],
        past_key_values=rcache,
        use_cache=True,
    )
    official._crop_to(rcache, 12)
    pos = torch.arange(12, 20 + draft.block_size)[None]
    ours = draft(emb, feats[:, 12:], pos, cache=cache)
    theirs = ref(
        position_ids=pos, noise_embedding=emb, target_hidden=feats[:, 12:], past_key_values=rcache, use_cache=True
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_saved_by_us_loads_in_official_and_back(tmp_path, qwen3_pair):
    target, draft = qwen3_pair
    draft.save_pretrained(tmp_path / "ours")
    ref = official.DFlashDraftModel.from_pretrained(tmp_path / "ours").eval()
    assert ref.mask_token_id == draft.mask_token_id and ref.target_layer_ids == draft.target_layer_ids
    assert ref.block_size == draft.block_size
    feats, emb, pos = _inputs(target, draft, seed=3)
    torch.testing.assert_close(
        draft(emb, feats, pos), ref(position_ids=pos, noise_embedding=emb, target_hidden=feats), atol=1e-5, rtol=1e-5
    )
    # ...and a draft saved by the official class loads in ours
    ref.save_pretrained(tmp_path / "theirs")
    back = DFlashDraft.from_pretrained(tmp_path / "theirs")
    for k, v in draft.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert back.mask_token_id == draft.mask_token_id and back.target_layer_ids == draft.target_layer_ids


@pytest.mark.parametrize("max_new_tokens", [37, 60])
@pytest.mark.parametrize("use_stop", [False, True])
def test_greedy_tokens_and_acceptance_equal_dflash_generate(max_new_tokens, use_stop):
    target, draft, ids = mixed_acceptance_pair()
    ref = _official_from(draft)
    ours_tokens, st = speculative_generate(target, draft, ids, max_new_tokens)
    stop = None
    if use_stop:  # stop on the token whose first appearance comes last, so the stop falls mid-generation
        new = ours_tokens[0, ids.shape[1] :].tolist()
        j = max(new.index(t) for t in set(new))
        assert j > 3
        stop = [new[j]]
        ours_tokens, st = speculative_generate(target, draft, ids, max_new_tokens, stop_token_ids=stop)
        assert ours_tokens.shape[1] == ids.shape[1] + j + 1 and int(ours_tokens[0, -1]) == stop[0]
    theirs = official.dflash_generate(ref, target, ids, max_new_tokens, stop, return_stats=True)
    assert ours_tokens.tolist() == theirs.output_ids.tolist()
    assert st.acceptance_lengths == theirs.acceptance_lengths
    if not use_stop:
        assert max(st.acceptance_lengths) >= 3  # the comparison covers multi-token acceptance, not only ones
