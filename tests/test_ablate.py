"""Layer ablation: every set trained with the same data, seed and budget, then measured by fidelity and the
diagnostic; table, figure, resume."""

import json

import pytest

from conftest import char_tokenizer, tiny_target
from draftguide.app.cli import main
from draftguide.errors import DraftGuideError
from draftguide.experiments.ablate import parse_layer_sets, run_ablation, set_name
from draftguide.training.data import make_data
from draftguide.training.train import TrainConfig


@pytest.fixture(scope="module")
def ablate_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    target, tok = tiny_target(), char_tokenizer()
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(["hello world", "abc", "the cat sat", "tiny model"])]
    make_data(target, tok, prompts, root / "data", max_new_tokens=16, batch_size=4, progress=False)
    return root


def test_parse_layer_sets():
    assert parse_layer_sets("1,8,14;27; 14 ") == [[1, 8, 14], [27], [14]]
    assert set_name([1, 8, 14]) == "L1-8-14"
    for bad in ("", "1,x", "1,1", "1;1", "30"):
        with pytest.raises(DraftGuideError):
            parse_layer_sets(bad, 28)


def _configs(out, sets):
    return {set_name(s): json.loads((out / "sets" / set_name(s) / "train_config.json").read_text()) for s in sets}


def test_ablate_command_trains_and_measures_every_set_alike(ablate_data, tmp_path, capsys):
    out = tmp_path / "abl"
    argv = [
        "ablate-layers",
        "--target",
        str(ablate_data / "target"),
        "--data",
        str(ablate_data / "data"),
        "--layer-sets",
        "1,3;4;2",
        "--steps",
        "3",
        "--block-size",
        "4",
        "--draft-layers",
        "1",
        "--batch-size",
        "2",
        "--anchors-per-seq",
        "4",
        "--log-every",
        "1",
        "--mask-token-id",
        "3",
        "--limit",
        "4",
        "--no-solve",
        "--fidelity-limit",
        "3",
        "--fidelity-max-new-tokens",
        "6",
        "--n-boot",
        "50",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    sets = [[1, 3], [4], [2]]
    s = json.loads((out / "summary.json").read_text())
    assert [r["set"] for r in s["rows"]] == ["L1-3", "L4", "L2"] and s["budget"]["steps"] == 3
    cfgs = _configs(out, sets)
    strip = lambda c: {k: v for k, v in c.items() if k != "target_layer_ids"}  # noqa: E731
    assert all(strip(c) == strip(cfgs["L1-3"]) for c in cfgs.values())  # same data, seed, budget, everything else
    assert {n: c["target_layer_ids"] for n, c in cfgs.items()} == {"L1-3": [1, 3], "L4": [4], "L2": [2]}
    assert all(c["context_includes_anchor"] and c["seed"] == 0 and c["total_steps"] == 3 for c in cfgs.values())
    assert all(c["vocab_subset"] is None for c in cfgs.values())  # default: the loss sees the whole vocabulary
    for r, ids in zip(s["rows"], sets):
        assert r["steps"] == r["total_steps"] == 3 and r["finished"] and r["layers"] == ids
        log = [json.loads(x) for x in (out / "sets" / r["set"] / "log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in log] == [1, 2, 3] and r["final_loss"] == log[-1]["loss"]
        draft_cfg = json.loads((out / "sets" / r["set"] / "draft" / "config.json").read_text())
        assert (
            draft_cfg["dflash_config"]["target_layer_ids"] == ids
            and draft_cfg["dflash_config"]["context_includes_anchor"]
        )
        f = r["fidelity"]
        assert 0 <= f["top1_agreement_k1"] <= 1 and f["null_top1_agreement_k1"] is not None and f["n_tokens_k1"] > 0
        fs = json.loads((out / "sets" / r["set"] / "fidelity" / "summary.json").read_text())
        assert fs["n_sequences"] == 3
        d = r["diagnostic"]
        assert d["verdict"] in ("inconclusive", "equivalent", "draft_better", "draft_worse") and set(
            d["vs_controls"]
        ) == {"shuffle", "gauss"}
    diag = json.loads((out / "diagnose" / "summary.json").read_text())
    assert diag["readouts"] == ["L1-3", "L4", "L2"] and diag["n_tasks"] == 4
    md = (out / "ablation.md").read_text()
    assert "3 steps per set" in md and "| L4 | 4 | 3/3 |" in md
    assert (out / "ablation.png").stat().st_size > 0 and "L1-3" in capsys.readouterr().out
    # a rerun resumes: finished sets are not retrained
    mtimes = {n: (out / "sets" / n / "log.jsonl").stat().st_mtime_ns for n in cfgs}
    lines = {n: (out / "sets" / n / "log.jsonl").read_text() for n in cfgs}
    argv[argv.index("--fidelity-limit") + 1] = "0"
    argv[argv.index("--limit") + 1] = "2"
    assert main(argv) == 0
    assert {n: (out / "sets" / n / "log.jsonl").read_text() for n in cfgs} == lines
    assert json.loads((out / "summary.json").read_text())["rows"][0]["resumed"] is True
    del mtimes


def test_equal_time_budget_for_every_set(ablate_data, tmp_path):
    target, tok = tiny_target(), char_tokenizer()
    cfg = TrainConfig(
        block_size=4,
        draft_layers=1,
        anchors_per_seq=4,
        batch_size=2,
        vocab_subset=None,
        log_every=1,
        checkpoint_every=0,
        steps=100_000,
        time_budget_s=2.0,
        mask_token_id=3,
    )
    s = run_ablation(target, tok, ablate_data / "data", [], tmp_path / "abl", [[1, 3], [4]], cfg, progress=False)
    cfgs = _configs(tmp_path / "abl", [[1, 3], [4]])
    assert all(c["time_budget_s"] == 2.0 and c["context_includes_anchor"] for c in cfgs.values())
    assert s["budget"]["time_budget_minutes"] == pytest.approx(2.0 / 60)
    for r in s["rows"]:
        assert r["finished"] and 11 <= r["total_steps"] < 100_000 and r["elapsed_s"] < 2.0 * 3
        assert "fidelity" not in r and "diagnostic" not in r  # nothing to measure on: skipped
    assert "wall time per set" in (tmp_path / "abl" / "ablation.md").read_text()
