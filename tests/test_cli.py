"""The CLI: bad input gives one clear error line and exit code 2, never a traceback; a good run writes
results.jsonl and summary.json with the promised fields."""

import json
import subprocess
import sys

import pytest

from conftest import tiny_draft, tiny_target
from draftguide.app.cli import main


def _err(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_negative_temperature(capsys, tmp_path):
    assert "temperature must be >= 0" in _err(capsys, ["speculate", "--temperature", "-1", "--out", str(tmp_path)])


def test_missing_draft_folder(capsys, tmp_path, tiny_target_dir):
    err = _err(
        capsys,
        ["speculate", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "missing"), "--out", str(tmp_path)],
    )
    assert "does not exist" in err


def test_corrupt_checkpoint(capsys, tmp_path, tiny_target_dir, tiny_draft_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_draft_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    err = _err(
        capsys, ["speculate", "--target", str(tiny_target_dir), "--draft", str(bad), "--out", str(tmp_path / "o")]
    )
    assert "corrupt draft weights" in err


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(target_layer_ids=[1, 3, 7]), "out of range"),
        (dict(mask_token_id=1000), "outside the target vocabulary"),
    ],
)
def test_mismatched_draft(capsys, tmp_path, tiny_target_dir, kw, message):
    from draftguide.modeling.draft import DFlashDraft

    d = DFlashDraft.for_target(
        tiny_target(), num_layers=1, block_size=4, **({"mask_token_id": 3, "target_layer_ids": [1, 2]} | kw)
    )
    d.save_pretrained(tmp_path / "d")
    err = _err(
        capsys,
        ["speculate", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
    )
    assert message in err


def test_feature_width_mismatch(capsys, tmp_path, tiny_target_dir):
    # a draft built for a 128-wide target cannot read a 64-wide one
    from transformers import AutoModelForCausalLM, Qwen3Config

    wide = AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=96,
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        )
    )
    tiny_draft(wide, mask_token_id=3).save_pretrained(tmp_path / "d")
    err = _err(
        capsys,
        ["speculate", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "d"), "--out", str(tmp_path / "o")],
    )
    assert "fc expects 384" in err


def test_empty_prompt(capsys, tmp_path, tiny_target_dir, tiny_draft_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "  "}]}) + "\n"
    )
    err = _err(
        capsys,
        [
            "speculate",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "line 2" in err and "empty prompt" in err


def test_malformed_prompt_line(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{oops\n')
    assert "p.jsonl:2: not valid JSON" in _err(
        capsys, ["speculate", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    )


def test_missing_target_folder(capsys, tmp_path):
    assert "nor an existing folder" in _err(
        capsys, ["speculate", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    # an explicit FR-Spec head must not hide the missing target (nor a missing draft) behind a traceback
    for cmd in ("speculate", "bench-tau"):
        err = _err(capsys, [cmd, "--target", str(tmp_path / "nope"), "--draft-vocab", "100", "--out", str(tmp_path)])
        assert "nor an existing folder" in err or "no shipped draft" in err


def test_missing_draft_folder_with_draft_vocab(capsys, tmp_path, tiny_target_dir):
    err = _err(
        capsys,
        ["speculate", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "gone"), "--draft-vocab", "10"]
        + ["--out", str(tmp_path / "o")],
    )
    assert "does not exist" in err


def test_speculate_writes_results_and_summary(tmp_path, tiny_target_dir, tiny_draft_dir):
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello there"}, {"messages": [{"role": "user", "content": "say something"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    # a real process: exit code, stdout table
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "draftguide.app.cli",
            "speculate",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tau" in proc.stdout and "lossless" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in ("n_prompts", "tau", "tokens_per_s", "baseline_tokens_per_s", "speedup", "lossless"):
        assert key in s, key
    assert s["n_prompts"] == 2 and s["lossless"] is True and s["tau"] >= 1.0
    res = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(res) == 2 and all(r["new_tokens"] == len(r["tokens"]) and r["acceptance_lengths"] for r in res)


def test_unknown_hub_id_is_one_clear_line(capsys, tmp_path):
    err = _err(capsys, ["speculate", "--target", "nobody/no-such-model", "--out", str(tmp_path)])
    assert "local folder" in err


def test_bench_tau_per_set_summary(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    a, b = tmp_path / "setA.jsonl", tmp_path / "setB.jsonl"
    a.write_text(json.dumps({"prompt": "abc"}) + "\n")
    b.write_text(json.dumps({"prompt": "xyz"}) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    code = main(
        [
            "bench-tau",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--sets",
            f"{a},{b}",
            "--out",
            str(tmp_path / "bt"),
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    s = json.loads((tmp_path / "bt" / "summary.json").read_text())
    assert set(s["sets"]) == {"setA", "setB"}
    assert s["sets"]["setB"]["n_prompts"] == 2 and s["sets"]["setA"]["lossless"] is True
    assert s["sets"]["setA"]["draft_dtype"] == "bfloat16"  # the CPU default beside an fp32 target
    assert "setB" in capsys.readouterr().out


def test_draft_dtype_reaches_the_draft(tiny_target_dir, tiny_draft_dir):
    """--draft-dtype sets the draft's dtype (the target keeps --dtype); commands that load drafts per method
    option (eval, sweep beta) do not offer it, rather than ignore it."""
    import torch

    from draftguide.app.cli import build_parser, load_models

    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "hi",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--draft-dtype",
            "bf16",
        ]
    )
    target, _, draft = load_models(args)
    assert next(target.parameters()).dtype == torch.float32 and next(draft.parameters()).dtype == torch.bfloat16
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--target", str(tiny_target_dir), "--draft", str(tiny_draft_dir)]
    )
    assert next(load_models(args)[2].parameters()).dtype == torch.float32
    for argv in (["eval", "--out", "o"], ["sweep", "beta", "--out", "o"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv + ["--draft-dtype", "bf16"])
