"""Issue 17, kind 10: no output file holds NaN or Infinity (strict parsers reject them); null instead, and the
table says why a figure is missing."""

import json
import math

import numpy as np
import torch


def strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_shared_writers_map_non_finite_to_null(tmp_path):
    from draftguide.reporting.runs import JsonlWriter, dumps, finite, write_json

    obj = {
        "a": float("nan"),
        "b": [float("inf"), -float("inf"), 1.5],
        "c": np.float32("nan"),
        "d": (np.float64(2.0),),
        "e": {"f": torch.tensor(float("nan"))},
        "g": np.array([1.0, np.nan]),
    }
    assert strict_load(dumps(obj)) == {
        "a": None,
        "b": [None, None, 1.5],
        "c": None,
        "d": [2.0],
        "e": {"f": None},
        "g": [1.0, None],
    }
    write_json(tmp_path / "s.json", obj)
    assert strict_load((tmp_path / "s.json").read_text())["a"] is None
    with JsonlWriter(tmp_path / "r.jsonl") as w:
        w.write({"tau": float("nan")})
    assert strict_load((tmp_path / "r.jsonl").read_text()) == {"tau": None}
    assert finite(float("nan")) is None and finite(3) == 3


def test_fmt_marks_missing():
    from draftguide.reporting.runs import fmt

    assert fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(float("inf"), ".1f") == "-" and fmt(1.234) == "1.23"


def test_speculate_one_token_writes_no_nan(tmp_path, qwen3_pair):
    """`speculate --max-new-tokens 1`: tau is undefined (no verify step); the files say null, the summary why."""
    from conftest import char_tokenizer
    from draftguide.experiments.speculate import TAU_MISSING, run_speculate

    t, d = qwen3_pair
    s = run_speculate(
        t, char_tokenizer(), d, [{"id": "p", "prompt": "hello there"}], tmp_path, max_new_tokens=1, progress=False
    )
    assert math.isnan(s["tau"])
    summary = strict_load((tmp_path / "summary.json").read_text())
    assert summary["tau"] is None and summary["tau_missing"] == TAU_MISSING
    rows = [strict_load(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[0]["tau"] is None


def test_speculate_table_says_why(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    from draftguide.app.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "speculate",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--prompts",
            "builtin",
            "--limit",
            "1",
            "--max-new-tokens",
            "1",
            "--out",
            str(out),
            "--no-baseline",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "tau -: no verify step ran" in text
    strict_load((out / "summary.json").read_text())


def test_eval_table_and_report_without_finished_tasks(tmp_path):
    from draftguide.experiments.evaluate import format_table, summarize_eval

    s = summarize_eval([{"task_id": "a", "status": "error", "error": "boom"}], n_tasks=1)
    table = format_table(s)
    assert "nan" not in table.lower() and "no task finished" in table
    from draftguide.reporting.runs import dumps

    assert strict_load(dumps(s))["solve_rate"] is None


def test_report_reads_null_figures(tmp_path):
    """A run folder whose summary holds null (written by the shared writer) still renders in `draftguide report`."""
    from draftguide.reporting.report import write_report
    from draftguide.reporting.runs import write_json

    run = tmp_path / "spec"
    write_json(
        run / "summary.json",
        {
            "n_prompts": 1,
            "new_tokens": 1,
            "block_size": 8,
            "verify_len": 7,
            "tau": float("nan"),
            "tau_ci95_over_prompts": [float("nan"), float("nan")],
            "tokens_per_s": 3.0,
            "temperature": 0.0,
            "acceptance_histogram": [],
            "tau_missing": "why",
            "max_new_tokens": 1,
            "environment": {},
        },
    )
    (run / "results.jsonl").write_text("")
    path = write_report([str(run)], tmp_path / "report")
    text = path.read_text()
    assert "Speculative decoding" in text and "| 1 | 1 | 8 | 7 | - [-, -] | 3.0 |" in text and "tau -: why" in text
    assert "nan" not in text.lower()
