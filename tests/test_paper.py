"""`draftguide report`: run folders made by the real CLI on tiny models, gathered into one markdown."""

import json

import pytest

from draftguide.app.cli import main


def _task(tid, answer, checks):
    return {
        "messages": [
            {"role": "system", "content": f"The code word is {answer}."},
            {"role": "user", "content": "Code word?"},
        ],
        "rubrics": ["Says the code word."],
        "reference_answer": answer,
        "checks": checks,
        "metadata": {"task_id": tid, "context_id": f"c-{tid}", "context_category": "Cat", "sub_category": "Sub"},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_target_dir, tiny_draft_dir):
    root = tmp_path_factory.mktemp("runs")
    tasks = root / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps(_task(f"t{i}", a, [{"type": "regex", "value": "."}])) + "\n"
            for i, a in enumerate(["tulip", "rose", "fern"])
        )
    )
    pair = ["--target", str(tiny_target_dir), "--draft", str(tiny_draft_dir)]
    cmds = {
        "speculate": ["speculate", *pair, "--prompts", "builtin", "--max-new-tokens", "8", "--no-baseline"],
        "eval": [
            "eval",
            "--target",
            str(tiny_target_dir),
            "--tasks",
            str(tasks),
            "--max-new-tokens",
            "4",
            "--judge",
            "rules",
        ],
        "diagnose": ["diagnose", *pair, "--tasks", str(tasks), "--no-solve", "--n-boot", "50"],
        "profile": [
            "profile",
            *pair,
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
        ],
        "ttt-tau": [
            "ttt-tau",
            *pair,
            "--sets",
            "suite-doc",
            "--limit",
            "2",
            "--context-tokens",
            "40",
            "--max-new-tokens",
            "6",
            "--ttt-steps",
            "1",
        ],
        "sweep-ttt": ["sweep", "ttt", *pair, "--tasks", str(tasks), "--steps", "0,1", "--max-new-tokens", "4"],
        "sweep-beta": [
            "sweep",
            "beta",
            *pair,
            "--tasks",
            str(tasks),
            "--betas",
            "0,1",
            "--baselines",
            "greedy",
            "--max-new-tokens",
            "4",
        ],
    }
    for name, argv in cmds.items():
        assert main([*argv, "--out", str(root / name)]) == 0, name
    (root / "junk").mkdir()
    return root, cmds


def test_report_gathers_every_run(runs, capsys):
    root, cmds = runs
    out = root / "report"
    dirs = [str(root / n) for n in (*cmds, "junk")] + [str(tasks) for tasks in [root / "tasks.jsonl"]] + [str(out)]
    assert main(["report", *dirs, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "junk" in err and "tasks.jsonl" in err and "skipped" in err
    md = (out / "report.md").read_text()
    for name, argv in cmds.items():
        assert f"`draftguide {' '.join(argv[: 2 if argv[0] == 'sweep' else 1])} " in md, name  # each run's own command
    from draftguide.reporting.report import TITLES

    for kind in cmds:
        assert f". {TITLES[kind]}: `" in md, kind  # every kind recognised
    assert "Verdict" in md and "solve rate" in md and "tau" in md and "95% CI" in md
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) >= 6 and all((out / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    assert {
        "heatmap.png",
        "profile.png",
        "acceptance.png",
        "solve_rate.png",
        "delta_tau.png",
        "sweep.png",
        "beta_sweep.png",
    } <= {link.rsplit("/", 1)[1] for link in links}
    captions = [line for line in md.splitlines() if line.startswith(("*Table", "*Figure", "*heatmap", "*profile"))]
    assert captions and all("Command: `draftguide" in c for c in captions)
    assert "report.md" not in md  # no leftover file links
    assert not any(line.startswith("# ") for line in md.splitlines()[1:])


def test_report_without_any_run_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no run folder" in capsys.readouterr().err
