"""`fidelity`: agreement 1 / KL 0 for a readout that is the target itself, a null below a readout that reads its
features, per-offset alignment, and the command end to end on a tiny target."""

import json

import torch

from conftest import tiny_draft, tiny_target
from draftguide.app.cli import main
from draftguide.experiments.fidelity import Sample, donor_features, measure_fidelity, summarize_fidelity

LAYERS = [1, 3, 4]


def _samples(n=4, T=20, n_prompt=6):
    g = torch.Generator().manual_seed(0)
    return [Sample(f"s{i}", torch.randint(4, 90, (T + i,), generator=g).tolist(), n_prompt) for i in range(n)]


def _target_readout(target):
    """A readout returning the target's own logits: offset k at anchor a reads the target at a + k - 1."""

    def read(features, ids, anchors, K=3):
        logits = target(ids).logits[0]  # [T, V]
        pos = (torch.tensor(anchors)[:, None] + torch.arange(K)).clamp_max(ids.shape[1] - 1)
        return logits[pos]  # [m, K, V]

    return read


def _feature_readout(target):
    """Reads the deepest selected layer's feature at a + k - 1 through the final norm and lm_head: uses its
    features, so the shuffled null must be worse."""

    def read(features, ids, anchors, K=3):
        d = features.shape[-1] // len(LAYERS)
        h = target.model.norm(features[0, :, -d:])
        pos = (torch.tensor(anchors)[:, None] + torch.arange(K)).clamp_max(ids.shape[1] - 1)
        return target.lm_head(h)[pos]

    return read


def test_the_target_as_readout_has_agreement_1_and_kl_0():
    target = tiny_target()
    raw = measure_fidelity(
        target, {"self": _target_readout(target)}, _samples(), null=False, layer_ids=LAYERS, progress=False
    )
    s = summarize_fidelity(raw)["readouts"]["self"]
    assert s["k"] == [1, 2, 3]
    assert s["top1_agreement"] == [1.0, 1.0, 1.0]
    assert max(abs(x) for x in s["kl"]) < 1e-5
    assert s["logp"] == s["target_logp"]  # same tokens, same distribution: alignment of token and teacher


def test_shuffled_null_is_lower_when_the_readout_uses_its_features():
    target = tiny_target()
    s = summarize_fidelity(
        measure_fidelity(target, {"feat": _feature_readout(target)}, _samples(6), layer_ids=LAYERS, progress=False)
    )["readouts"]["feat"]
    null = s["controls"]["shuffled"]
    assert s["top1_agreement"][0] > null["top1_agreement"][0] + 0.2
    assert s["kl"][0] < null["kl"][0]
    # a readout that ignores its features scores the same under its null
    const = lambda f, ids, anchors: torch.zeros(len(anchors), 3, 96)  # noqa: E731
    c = summarize_fidelity(measure_fidelity(target, {"c": const}, _samples(), layer_ids=LAYERS, progress=False))[
        "readouts"
    ]["c"]
    assert c["kl"] == c["controls"]["shuffled"]["kl"]


def test_shuffled_features_are_another_sequences_real_features():
    f = [torch.full((1, 5, 2), 1.0), torch.arange(6.0)[None, :, None].repeat(1, 1, 2), torch.full((1, 3, 2), 7.0)]
    assert torch.equal(donor_features(f, 0), f[1][:, :5])
    assert donor_features(f, 1)[0, :, 0].tolist() == [7.0] * 6  # tiled from the shorter one
    assert torch.equal(donor_features(f, 2), f[0][:, :3])


def test_fidelity_command_on_a_tiny_pair(tmp_path, tiny_target_dir, tiny_draft_dir):
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate([("hi", "hello there"), ("why", "because it is so"), ("what", "a small thing")])
    ]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fid"
    tiny_draft(tiny_target(), seed=5, mask_token_id=3).save_pretrained(tmp_path / "other")
    argv = [
        "fidelity",
        "--target",
        str(tiny_target_dir),
        "--draft",
        f"{tiny_draft_dir},{tmp_path / 'other'}",
        "--text",
        str(tmp_path / "text.jsonl"),
        "--out",
        str(out),
        "--n-boot",
        "50",
    ]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["top1_agreement"]) == 7 and len(s["kl"]) == 7  # offsets 1..B-1 of the block-8 draft
    assert "shuffled" in s["controls"] and set(s["readouts"]) == {tiny_draft_dir.name, "other"}
    assert s["n_sequences"] == 3 and (out / "fidelity.png").stat().st_size > 0
    # the written samples can be measured again as --data
    assert (
        main(
            [
                "fidelity",
                "--target",
                str(tiny_target_dir),
                "--draft",
                str(tiny_draft_dir),
                "--data",
                str(out),
                "--out",
                str(tmp_path / "again"),
                "--no-null",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["top1_agreement"] == s["readouts"][tiny_draft_dir.name]["top1_agreement"]
