"""`draftguide eval --method guided|guided-noise|power|dola`, `sweep beta` and `generate` on tiny local models."""

import json
from pathlib import Path

import pytest

from draftguide.app.cli import main

ANY = [{"type": "regex", "value": "."}]
NEVER = [{"type": "contains", "value": "no tiny model says this"}]


def _task(tid, question, checks):
    return {
        "messages": [
            {"role": "system", "content": f"context of {tid}: abc xyz"},
            {"role": "user", "content": question},
        ],
        "checks": checks,
        "metadata": {"task_id": tid, "context_category": "Cat", "sub_category": "A"},
    }


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [_task("t0", "q0 abc", ANY), _task("t1", "q1 xyz", NEVER), _task("t2", "q2", ANY)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _eval(target, draft, tasks, out, *extra) -> int:
    return main(
        [
            "eval",
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--tasks",
            str(tasks),
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
            "--judge",
            "rules",
            *extra,
        ]
    )


def test_eval_guided_methods(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file):
    assert _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "greedy") == 0
    assert _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "b0", "--method", "guided", "--beta", "0") == 0
    assert (
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "b1",
            "--method",
            "guided",
            "--beta",
            "1",
            "--speculative",
        )
        == 0
    )
    assert (
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "n1",
            "--method",
            "guided-noise",
            "--beta",
            "1",
            "--seed",
            "3",
        )
        == 0
    )
    greedy, b0, b1, n1 = (_rows(tmp_path / d) for d in ("greedy", "b0", "b1", "n1"))
    assert [r["response"] for r in b0] == [r["response"] for r in greedy] and all(r["flips"] == [] for r in b0)
    assert any(r["flips"] for r in b1) and any(r["flips"] for r in n1)
    f = next(f for r in b1 for f in r["flips"])
    assert set(f) >= {
        "i",
        "target",
        "guided",
        "target_text",
        "guided_text",
        "guided_in_context",
        "guided_id_in_context",
    }
    run = json.loads((tmp_path / "b1" / "run.json").read_text())
    assert run["method_options"]["beta"] == 1.0 and run["method_options"]["speculative"] is True
    assert Path(run["method_options"]["draft"]) == Path(tiny_draft_dir).resolve()


def test_eval_baseline_methods(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file):
    assert (
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "p",
            "--method",
            "power",
            "--power-preset",
            "cpu",
            "--mcmc-steps",
            "3",
        )
        == 0
    )
    assert (
        _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "d", "--method", "dola", "--dola-layers", "0,2")
        == 0
    )
    assert (
        _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "s", "--method", "sample", "--temperature", "0.7")
        == 0
    )
    assert all(
        r["status"] == "ok" and r["tokens_per_output_token"] > 1 for r in _rows(tmp_path / "p")
    )  # MCMC resamples
    assert all(
        r["power"] == {"preset": "cpu", "alpha": 4.0, "block_num": 4, "mcmc_steps": 3} for r in _rows(tmp_path / "p")
    )
    assert all(set(r["premature_layers"]) <= {0, 2} for r in _rows(tmp_path / "d"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "guided"], "needs option(s) ['beta']"),
        (["--method", "guided", "--beta", "0.5", "--alpha", "2"], "--alpha does not apply to method 'guided'"),
        (["--beta", "0.5"], "--beta does not apply to method 'greedy'"),
        (["--method", "dola", "--speculative"], "--speculative does not apply"),
    ],
)
def test_eval_bad_options(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file, capsys, extra, message):
    assert _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag, pointer", [("--n-mcmc", "use --mcmc-steps"), ("--power-block-size", "use --block-num")])
def test_renamed_power_flags_point_to_the_new_ones(
    tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file, capsys, flag, pointer
):
    with pytest.raises(SystemExit):
        _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "x", "--method", "power", flag, "2")
    assert pointer in capsys.readouterr().err


def test_removed_mix_is_refused_with_a_pointer(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file, capsys):
    with pytest.raises(SystemExit) as e:  # an argparse error, before any model is loaded
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "x",
            "--method",
            "guided",
            "--beta",
            "0.5",
            "--mix",
            "logprobs",
        )
    assert e.value.code == 2 and "use mix 'probs'" in capsys.readouterr().err
    assert (
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "p",
            "--method",
            "guided",
            "--beta",
            "0.5",
            "--mix",
            "probs",
        )
        == 0
    )
    assert json.loads((tmp_path / "p" / "run.json").read_text())["method_options"]["mix"] == "probs"


def test_sweep_beta_outputs(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "beta",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--tasks",
            str(tasks_file),
            "--out",
            str(out),
            "--betas",
            "0,0.5,1",
            "--max-new-tokens",
            "6",
            "--power-preset",
            "cpu",
            "--mcmc-steps",
            "1",
        ]
    )
    assert code == 0
    for f in ("summary.json", "report.md", "beta_sweep.png", "flips.jsonl"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert [p["beta"] for p in s["curves"]["guided"]] == [0, 0.5, 1] == [p["beta"] for p in s["curves"]["noise"]]
    assert s["curves"]["noise"][0]["run"] == "guided_b0"  # beta 0 is greedy for both curves: run once
    assert set(s["baselines"]) == {"greedy", "power", "dola"}
    assert (
        main(
            [
                "eval",
                "--target",
                str(tiny_target_dir),
                "--tasks",
                str(tasks_file),
                "--out",
                str(tmp_path / "greedy"),
                "--max-new-tokens",
                "6",
                "--judge",
                "rules",
            ]
        )
        == 0
    )  # an independent greedy run agrees with beta 0
    greedy = [int(r["score"]) for r in _rows(tmp_path / "greedy")]
    assert s["curves"]["guided"][0]["solve_rate"] == s["baselines"]["greedy"]["solve_rate"] == sum(greedy) / len(greedy)
    assert s["curves"]["guided"][2]["flips"]["flips_per_token"] > 0
    assert "| 0.5 |" in (out / "report.md").read_text()
    assert not (out / "noise_b0").exists() and not (out / "greedy").exists()


def test_generate_streams(tiny_target_dir, tiny_draft_dir, capsys):
    base = [
        "generate",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "12",
    ]
    assert main(base + ["--beta", "0.5"]) == 0
    guided = capsys.readouterr()
    assert main(base + ["--beta", "0.5", "--speculative"]) == 0
    spec = capsys.readouterr()
    assert guided.out == spec.out and guided.out.strip() and "tokens in" in guided.err
    assert main(base + ["--beta", "0.5", "--speculative", "--verify-len", "1"]) == 0
    assert capsys.readouterr().out == guided.out
    assert main(base + ["--beta", "0.5", "--verify-len", "1"]) == 2
    assert "--verify-len needs --speculative" in capsys.readouterr().err
    assert main(base + ["--beta", "2"]) == 2
    assert "beta must be in [0, 1]" in capsys.readouterr().err
    assert main(base + ["--beta", "0.5", "--ttt", "--ttt-steps", "2", "--ttt-anchors", "4"]) == 0
    assert "[TTT on the prompt: 2 steps" in capsys.readouterr().err


def test_eval_guided_with_ttt(tmp_path, tiny_target_dir, tiny_draft_dir, tasks_file, capsys):
    assert (
        _eval(
            tiny_target_dir,
            tiny_draft_dir,
            tasks_file,
            tmp_path / "t",
            "--method",
            "guided",
            "--beta",
            "1",
            "--ttt",
            "--ttt-steps",
            "2",
            "--ttt-anchors",
            "4",
        )
        == 0
    )
    rows = _rows(tmp_path / "t")
    assert all(r["status"] == "ok" and r["ttt"]["loss_after"] < r["ttt"]["loss_before"] for r in rows)
    run = json.loads((tmp_path / "t" / "run.json").read_text())
    assert run["method_options"]["ttt"]["steps"] == 2
    assert _eval(tiny_target_dir, tiny_draft_dir, tasks_file, tmp_path / "x", "--method", "dola", "--ttt") == 2
    assert "--ttt does not apply" in capsys.readouterr().err
