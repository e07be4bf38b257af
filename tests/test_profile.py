"""`draftguide profile`: every measurement present and consistent with the model's shapes (times are not checked)."""

import json

import pytest

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.cli import main
from draftguide.experiments.profiling import run_profile, weight_bytes_per_token


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    t = tiny_target()
    out = tmp_path_factory.mktemp("profile")
    s = run_profile(
        t,
        char_tokenizer(),
        tiny_draft(t, mask_token_id=3),
        out,
        context_lens=(16, 64, 10_000),
        repeats=2,
        new_tokens=6,
        anchors=4,
        ttt_steps=1,
        copy_megabytes=4,
        progress=False,
    )
    return s, out


def test_prefill_rows_and_feature_memory(profile):
    s, _ = profile
    assert [r["context_len"] for r in s["prefill"]] == [16, 64]  # 10k is past max_position_embeddings (4096)
    for r in s["prefill"]:
        assert r["features_bytes"] == r["context_len"] * 3 * 64 * 4  # 3 selected layers x d=64 x fp32
        assert r["kv_cache_bytes"] == r["context_len"] * 2 * 6 * 2 * 16 * 4  # K+V x layers x kv heads x head_dim x fp32
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["n"] == 2


def test_costs_and_bandwidth(profile):
    s, _ = profile
    d = s["decode"]
    assert d["speculative_tau"] >= 1 and d["greedy_tokens_per_s"] > 0 and d["verify_8_s"] > 0
    assert d["achieved_bandwidth_GBps"] == pytest.approx(d["weight_bytes_per_token"] * d["greedy_tokens_per_s"] / 1e9)
    m = s["memory_bandwidth"]
    assert m["copy_GBps"] > 0 and m["read_GBps"] > 0
    assert s["bandwidth_fraction"] == pytest.approx(d["achieved_bandwidth_GBps"] / max(m["copy_GBps"], m["read_GBps"]))
    assert s["draft"]["multi_anchor"]["anchors"] == 4 and s["draft"]["block_step"]["median_s"] > 0


def test_ttt_and_guided_costs(profile):
    s, _ = profile
    t, g = s["ttt"], s["guided"]
    assert t["available"] and t["steps"] == 1 and t["context_len"] == 64 and t["step_s"] > 0
    assert t["ttt16_over_prefill"] == pytest.approx(16 * t["step_s"] / s["prefill"][1]["median_s"])
    assert g["available"] and g["token_over_greedy"] == pytest.approx(
        g["token_s_per_token"] / s["decode"]["greedy_s_per_token"]
    )
    assert g["speculative_s_per_token"] > 0 and g["speculative_v1_s_per_token"] > 0


def test_outputs_written(profile):
    s, out = profile
    assert json.loads((out / "summary.json").read_text())["kind"] == "profile"
    md = (out / "report.md").read_text()
    assert "## Target prefill vs context length" in md and "![profile.png](profile.png)" in md
    assert "exact speculative guided, verify_len 1" in md
    assert (out / "profile.png").stat().st_size > 1000


def test_weight_bytes_counts_an_untied_embedding_as_one_row():
    t = tiny_target()  # untied: vocab 96 x d 64 embedding, of which a step reads one row
    total = sum(p.numel() * 4 for p in t.parameters())
    assert weight_bytes_per_token(t) == total - 96 * 64 * 4 + 64 * 4


def test_cli_profile_records_its_command(tmp_path, tiny_target_dir, tiny_draft_dir):
    out = tmp_path / "p"
    argv = [
        "profile",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--out",
        str(out),
        "--context-lens",
        "16,32",
        "--repeats",
        "1",
        "--new-tokens",
        "4",
        "--anchors",
        "2",
        "--copy-mb",
        "1",
    ]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["command"].startswith("draftguide profile --target")
    assert (out / "command.txt").read_text().split() == ["draftguide", *argv]


def test_cli_profile_bad_lengths(capsys, tmp_path):
    assert main(["profile", "--out", str(tmp_path), "--context-lens", "1,64"]) == 2
    assert "--context-lens" in capsys.readouterr().err
