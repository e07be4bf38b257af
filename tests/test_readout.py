"""The aligned readout (`dflash_config.context_includes_anchor`): its blocks see the anchor's own target features,
so its k=1 prediction reads what `lm_head` reads; everything that cannot use it refuses it in one line."""

import json

import dflash.model as official
import pytest
import torch

from conftest import tiny_draft, tiny_target
from draftguide.app.cli import main
from draftguide.decode.guided import guided_generate
from draftguide.decode.speculative import greedy_generate, speculative_generate
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, multi_block_hidden
from draftguide.modeling.draft_io import load_draft
from draftguide.modeling.targets import extract_features


def aligned(target, seed=1, **kw):
    return (
        DFlashDraft.for_target(
            target,
            num_layers=2,
            block_size=4,
            mask_token_id=3,
            target_layer_ids=[1, 3, 4],
            context_includes_anchor=True,
            seed=seed,
            **kw,
        )
        .eval()
        .requires_grad_(False)
    )


def _k1(draft, target, feats, ids, anchor):
    with torch.no_grad():
        return multi_block_hidden(draft, target, feats, ids, torch.tensor([[anchor]]))[0, 0, 1]


@pytest.mark.parametrize("includes", [True, False])
def test_the_anchors_own_feature_reaches_k1_only_when_included(includes):
    target = tiny_target()
    d = aligned(target) if includes else tiny_draft(target, block_size=4, mask_token_id=3)
    assert d.context_includes_anchor is includes
    ids = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    feats = extract_features(target(ids, output_hidden_states=True).hidden_states, d.target_layer_ids)
    a = 7
    poked = feats.clone()
    poked[:, a] += 5.0  # the anchor's own feature
    changed = not torch.allclose(_k1(d, target, feats, ids, a), _k1(d, target, poked, ids, a))
    assert changed is includes
    later = feats.clone()
    later[:, a + 1] += 5.0  # features after the anchor never reach its block
    torch.testing.assert_close(_k1(d, target, feats, ids, a), _k1(d, target, later, ids, a))


def test_aligned_readout_round_trips_and_loads_in_official_dflash(tmp_path):
    target = tiny_target()
    d = aligned(target)
    d.save_pretrained(tmp_path / "ro")
    cfg = json.loads((tmp_path / "ro" / "config.json").read_text())
    assert cfg["dflash_config"]["context_includes_anchor"] is True
    back = load_draft(tmp_path / "ro", target)
    assert back.context_includes_anchor and back.mask_token_id == 3
    ref = official.DFlashDraftModel.from_pretrained(tmp_path / "ro").eval()  # ignores the unknown key
    assert set(ref.state_dict()) == set(d.state_dict())
    for k, v in d.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[k], v)


def test_speculative_decoding_refuses_the_aligned_readout():
    target = tiny_target()
    d = aligned(target)
    ids = torch.randint(4, 90, (1, 6))
    with pytest.raises(DraftGuideError, match="aligned readout"):
        speculative_generate(target, d, ids, 8)
    with pytest.raises(DraftGuideError, match="aligned readout"):
        guided_generate(target, d, ids, beta=0.5, max_new_tokens=8, speculative=True)


def test_speculate_command_refuses_it_with_one_line_and_exit_2(tmp_path, tiny_target_dir, capsys):
    target = tiny_target()
    aligned(target).save_pretrained(tmp_path / "ro")
    code = main(
        ["speculate", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "ro"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "aligned readout" in err[0] and err[0].startswith("draftguide: error:")


@torch.inference_mode()
def _reference(target, draft, ids, beta, n):
    """No caches: a full target forward per step and the k=1 readout of one block at the last token."""
    for _ in range(n):
        out = target(ids, output_hidden_states=True)
        feats = extract_features(out.hidden_states, draft.target_layer_ids)
        h = multi_block_hidden(draft, target, feats, ids, torch.tensor([[ids.shape[1] - 1]]))
        g = (1 - beta) * out.logits[:, -1] + beta * draft.logits(h[:, 0, 1], target)
        ids = torch.cat([ids, g.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_guided_with_the_aligned_readout(beta):
    """Token-by-token guidance feeds the readout the newest token's features before reading it: equal to the
    uncached reference at any beta, and to plain greedy at beta 0."""
    target = tiny_target()
    d = aligned(target)
    ids = torch.randint(4, 90, (1, 9), generator=torch.Generator().manual_seed(2))
    out, st = guided_generate(target, d, ids, beta=beta, max_new_tokens=12)
    assert out.tolist() == _reference(target, d, ids, beta, 12).tolist()
    if beta == 0.0:
        assert out.tolist() == greedy_generate(target, ids, 12)[0].tolist()
    if beta == 1.0:
        assert st.flips  # an untrained readout disagrees with the target somewhere


def test_shipped_names_resolve_as_drafts(tmp_path):
    """`--draft smollm2-135m-dflash` and `--draft smollm2-135m-readout` address the shipped folders; the readout is
    an aligned readout and the speculative draft is not."""
    from draftguide.modeling.draft_io import MODELS_DIR, draft_path

    for name, aligned_kind in (("smollm2-135m-dflash", False), ("smollm2-135m-readout", True)):
        assert draft_path(name) == MODELS_DIR / name
        assert load_draft(name).context_includes_anchor is aligned_kind
    assert draft_path(str(tmp_path)) == tmp_path  # a folder stays a folder
