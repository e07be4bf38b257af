"""Distillation from the target's own distribution (the training recipe v2): the loss, the teacher's
positions, and training from an existing draft (into a speculative draft or an aligned readout)."""

import torch
import torch.nn.functional as F

from conftest import char_tokenizer, tiny_target
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.draft_io import load_draft
from draftguide.modeling.targets import extract_features
from draftguide.training.train import (
    IGNORE,
    TrainConfig,
    block_labels,
    block_loss,
    draft_loss,
    kd_loss,
    loss_weights,
    teacher_positions,
    train_draft,
)


def test_kd_equals_ce_for_a_one_hot_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 11)
    labels = torch.randint(0, 11, (2, 3, 4))
    labels[1, 2] = IGNORE  # a padding block
    w = loss_weights(5)
    ce, _, _ = draft_loss(logits, labels, w)
    one_hot = F.one_hot(labels.clamp_min(0), 11).float()
    kd = kd_loss(logits, one_hot, labels != IGNORE, w)
    torch.testing.assert_close(kd, ce)
    soft = torch.softmax(torch.randn(2, 3, 4, 11), -1)
    assert not torch.allclose(kd_loss(logits, soft, labels != IGNORE, w), ce)  # a soft teacher is another loss


def test_teacher_for_offset_k_is_the_target_at_anchor_plus_k_minus_1():
    pos = teacher_positions(torch.tensor([[3, 10]]), block_size=4)
    assert pos.tolist() == [[[3, 4, 5], [10, 11, 12]]]
    # the label of offset k is the token at anchor + k: the target predicts it at anchor + k - 1
    ids = torch.arange(100, 120)[None]
    lab = block_labels(ids, torch.tensor([[3, 10]]), torch.tensor([20]), 4)
    assert (lab - 100 == pos + 1).all()


def test_kd_loss_reads_the_target_distribution_at_the_teacher_positions():
    """With a draft whose states equal the target's final states one step later, the kd loss at offset 1 is the
    target's own entropy; any other alignment of the teacher gives a different number."""
    target = tiny_target()
    d = DFlashDraft.for_target(target, num_layers=1, block_size=2, mask_token_id=3, target_layer_ids=[1, 3])
    ids = torch.randint(4, 90, (1, 16), generator=torch.Generator().manual_seed(0))
    out = target(ids, output_hidden_states=True)
    final = out.hidden_states[-1]  # [1, T, d] normed final states: lm_head(final[t]) predicts t+1
    anchors = torch.tensor([[4, 7, 11]])
    # a "draft" whose k=1 state at anchor a is exactly the target's final state at a (the teacher position)
    fake_forward = lambda emb, feats, pos, attention_mask=None, rows=None: final[:, anchors[0]].repeat_interleave(2, 1)  # noqa: E731
    feats = extract_features(out.hidden_states, d.target_layer_ids)
    loss, acc, n, agree = block_loss(
        d,
        target,
        feats,
        ids,
        anchors,
        torch.tensor([16]),
        loss_weights(2),
        forward=fake_forward,
        teacher_states=final,
        loss="kd",
    )
    p = torch.softmax(out.logits[0, anchors[0]], -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(loss, entropy, rtol=1e-4, atol=1e-5)
    assert agree.tolist() == [1.0]
    shifted = block_loss(
        d,
        target,
        feats,
        ids,
        anchors,
        torch.tensor([16]),
        loss_weights(2),
        forward=fake_forward,
        teacher_states=torch.roll(final, 1, 1),
        loss="kd",
    )[0]
    assert shifted > loss + 1e-3


def _text_data(root):
    from draftguide.training.data import make_text_data

    tok = char_tokenizer()
    rows = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(
            [
                ("hi", "hello there friend"),
                ("2+2?", "it is four, of course"),
                ("colour?", "blue like the sky"),
                ("name?", "a tiny model"),
            ]
        )
    ]
    meta = make_text_data(tok, rows, root / "data", progress=False)
    return tok, meta


def test_text_data_marks_the_reply_as_labels(tmp_path):
    from draftguide.training.data import read_samples

    tok, meta = _text_data(tmp_path)
    assert meta["n_samples"] == 4 and meta["responses"].startswith("given")
    s = read_samples(tmp_path / "data")[0]
    text = lambda ids: tok.decode(ids).replace(" ", "")  # noqa: E731 (char-level: decode spaces its pieces)
    assert text(s["input_ids"][s["prompt_len"] :]).startswith("hellotherefriend")
    assert text(s["input_ids"][: s["prompt_len"]]).endswith("assistant:")


def test_train_kd_from_an_existing_draft_into_an_aligned_readout(tmp_path):
    target = tiny_target()
    tok, _ = _text_data(tmp_path)
    base = DFlashDraft.for_target(target, num_layers=1, block_size=4, mask_token_id=3, target_layer_ids=[1, 3])
    base.save_pretrained(tmp_path / "base")
    cfg = TrainConfig(
        steps=3,
        batch_size=2,
        anchors_per_seq=8,
        max_len=64,
        vocab_subset=None,
        loss="mix",
        init_from=str(tmp_path / "base"),
        context_includes_anchor=True,
        block_size=2,
        checkpoint_every=0,
        log_every=1,
    )
    res = train_draft(target, tok, tmp_path / "data", tmp_path / "run", cfg, progress=False)
    assert res["finished"]
    out = load_draft(res["draft"], target)
    assert out.context_includes_anchor and out.block_size == 2 and len(out.layers) == 1
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["agree"][0] <= 1 for r in rows) and rows[-1]["labels_seen"] > rows[0]["labels_seen"]
    # the starting draft's weights were loaded (not a fresh init): q_proj moved only by 3 small steps
    start = base.layers[0].self_attn.q_proj.weight
    moved = (out.layers[0].self_attn.q_proj.weight.float() - start).abs().max()
    assert moved < 0.05 * start.abs().max()
