"""Linear probes: ~100% where the label is linearly encoded, ~50% with shuffled labels, no context leaks."""

import json

import numpy as np
import pytest
import torch

from draftguide.app.cli import main
from draftguide.experiments.probe import answer_split, cv_predictions, probe_accuracy, shuffle_labels


def _linear(n=150, d=16, seed=0, pairs=True):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(size=(n, d))
    if pairs:  # the probe's own layout: (x, 1) and (-x, 0) per context
        X = X * np.sign(X @ w)[:, None]  # x @ w > 0: label 1
        return (
            np.concatenate([X, -X])[np.argsort(np.r_[np.arange(n), np.arange(n)], kind="stable")],
            np.tile([1, 0], n),
            np.repeat(np.arange(n), 2),
        )
    return X, (X @ w > 0).astype(int), np.arange(n) // 3


@pytest.mark.parametrize("pairs", [True, False])
def test_linearly_encoded_label_is_found_and_shuffled_is_chance(pairs):
    X, y, g = _linear(pairs=pairs)
    r = probe_accuracy(X, y, g, n_boot=300, shuffles=4, intercept=not pairs)
    assert r["accuracy"] >= 0.95 and r["ci95"][0] >= 0.9
    assert 0.35 <= r["shuffled"]["accuracy"] <= 0.65
    assert r["shuffled"]["ci95"][0] < 0.5 < r["ci95"][0]


def test_shuffle_flips_whole_contexts():
    y, g = np.tile([1, 0], 50), np.repeat(np.arange(50), 2)
    ys = shuffle_labels(y, g, np.random.default_rng(0))
    assert (ys[::2] + ys[1::2] == 1).all()  # each context keeps one reference and one distractor
    assert 10 < (ys != y).sum() / 2 < 40  # about half the contexts flipped


def test_no_context_leaks_between_folds():
    # each context: 4 identical copies of one random point with one random label. A probe that saw a copy in
    # training would recall the label; grouped by context it cannot: chance.
    rng = np.random.default_rng(1)
    n, d = 60, 100
    base, lab = rng.normal(size=(n, d)), rng.integers(0, 2, n)
    X, y, g = np.repeat(base, 4, 0), np.repeat(lab, 4), np.repeat(np.arange(n), 4)
    grouped = ((cv_predictions(X, y, g, intercept=True) > 0.5) == y).mean()
    leaky = ((cv_predictions(X, y, np.arange(len(y)), intercept=True) > 0.5) == y).mean()
    assert leaky > 0.95  # what a split that ignores contexts reports
    assert grouped < 0.75


def test_answer_split():
    assert answer_split([5, 6, 7], [5, 9]) == 1
    assert answer_split([1], [2]) == 0
    assert answer_split([5, 6], [5, 6, 7]) is None  # a prefix: they never differ in a token


def test_probe_command_on_tiny_models(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    out = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                "--target",
                str(tiny_target_dir),
                "--draft",
                str(tiny_draft_dir),
                "--limit",
                "16",
                "--out",
                str(out),
                "--folds",
                "4",
                "--shuffles",
                "2",
                "--n-boot",
                "200",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert set(s["representations"]) == {"target_last", "layer_1", "layer_3", "layer_4", "draft"}
    assert s["n_tasks"] + s["n_skipped"] == 16 and s["n_tasks"] >= 12
    for r in s["representations"].values():
        assert 0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["n_groups"] == s["n_tasks"] and r["n_examples"] == 2 * s["n_tasks"] and "shuffled" in r
    rows = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    f = np.load(out / "features.npz")
    assert (f["groups"][::2] == np.array([r["context_id"] for r in rows])).all() and (
        f["groups"][1::2] == f["groups"][::2]
    ).all()
    # the unfitted probe on the target's last state is the target's own logit difference (reference - distractor)
    diffs = np.array([r["zero_shot_logit_diff"]["target_last"] for r in rows])
    np.testing.assert_allclose(f["X_target_last"][::2].sum(1), diffs, rtol=1e-3, atol=1e-3)
    assert s["representations"]["target_last"]["zero_shot"]["accuracy"] == pytest.approx((diffs > 0).mean())
    # and the answer position is where the target chooses: recompute one task's logits directly
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.modeling.prompts import encode_prompt
    from draftguide.modeling.targets import load_target

    target, tok = load_target(str(tiny_target_dir))
    task = next(t for t in load_tasks("builtin")[0] if t["metadata"]["task_id"] == rows[0]["task_id"])
    ids = encode_prompt(tok, task)
    r_tok, s_tok = rows[0]["tokens"]
    with torch.no_grad():
        logits = target(ids).logits[0, -1]
    assert rows[0]["common_prefix"] == 0 and float(logits[r_tok] - logits[s_tok]) == pytest.approx(diffs[0], abs=1e-3)
    assert (out / "probe.png").stat().st_size > 0 and "shuffled labels" in (out / "report.md").read_text()
    assert "target_last" in capsys.readouterr().out


def test_paired_difference_to_what_lm_head_reads():
    from draftguide.experiments.probe import analyse

    X, y, g = _linear(n=120)
    noise = np.random.default_rng(1).normal(size=X.shape)
    data = {"X": {"target_last": noise, "draft": X, "same": noise.copy()}, "y": y, "groups": g}
    data |= {"rows": [{}] * 120, "skipped": []}
    s = analyse(data, n_boot=300, shuffles=0)
    reps = s["representations"]
    assert "vs_target_last" not in reps["target_last"]
    assert reps["draft"]["vs_target_last"]["diff"] > 0.3 and reps["draft"]["vs_target_last"]["ci95"][0] > 0
    assert reps["same"]["vs_target_last"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert "correct" not in reps["draft"] and "correct" not in reps["draft"]["zero_shot"]
    json.dumps(s)  # everything it returns is JSON
