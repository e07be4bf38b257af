"""Prompt sources read from small fixtures shaped like the packaged files."""

import gzip
import json

import pytest

from draftguide.errors import DraftGuideError
from draftguide.training.datasources import HELD_OUT, humaneval, iter_json_array, mtbench, sharegpt


def _sharegpt_file(tmp_path, n=5, truncate=True):
    recs = [
        {
            "id": f"r{i}",
            "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "answer"}],
        }
        for i in range(n)
    ]
    recs.insert(2, {"id": "bot-first", "conversations": [{"from": "gpt", "value": "hello"}]})
    recs.insert(3, {"id": "empty", "conversations": [{"from": "human", "value": "   "}]})
    text = json.dumps(recs, indent=1)
    path = tmp_path / "sg.json"
    path.write_text(
        text[: len(text) - 40] if truncate else text
    )  # cut inside the last record, as the package's file is
    return path


def test_truncated_json_array_decodes_record_by_record(tmp_path):
    path = _sharegpt_file(tmp_path, truncate=True)
    ids = [r["id"] for r in iter_json_array(path, chunk=64)]  # tiny chunks: records span reads
    assert ids == ["r0", "r1", "bot-first", "empty", "r2", "r3"]  # r4 was cut off
    full = [r["id"] for r in iter_json_array(_sharegpt_file(tmp_path, truncate=False), chunk=7)]
    assert full[-1] == "r4" and len(full) == 7


def test_sharegpt_first_human_turns(tmp_path):
    rows = sharegpt(_sharegpt_file(tmp_path))
    assert [r["messages"][0]["content"] for r in rows] == ["question 0", "question 1", "question 2", "question 3"]
    assert all(r["source"] == "sharegpt" and r["messages"][0]["role"] == "user" for r in rows)
    assert [r["id"] for r in sharegpt(_sharegpt_file(tmp_path), skip=2, limit=1)] == ["sharegpt-r2"]


def test_mtbench_and_humaneval(tmp_path):
    mt = tmp_path / "q.jsonl"
    mt.write_text(
        "".join(
            json.dumps({"question_id": i, "category": "writing", "turns": [f"t{i}", "follow-up"]}) + "\n"
            for i in (81, 82)
        )
    )
    rows = mtbench(mt)
    assert [r["id"] for r in rows] == ["mtbench-81", "mtbench-82"] and rows[0]["messages"][0]["content"] == "t81"
    he = tmp_path / "he.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    rows = humaneval(he)
    assert rows[0]["id"] == "HumanEval-0" and "def f():" in rows[0]["messages"][0]["content"]


def test_held_out_sets_are_refused_as_training_prompts(capsys, tmp_path):
    from draftguide.app.cli import main

    assert {"mtbench", "humaneval"} <= set(HELD_OUT)
    assert main(["make-data", "--prompts", "mtbench", "--out", str(tmp_path)]) == 2
    assert "held-out" in capsys.readouterr().err


def test_unknown_source(tmp_path):
    from draftguide.training.datasources import load_source

    with pytest.raises(DraftGuideError, match="unknown prompt source"):
        load_source("nope")


def test_gsm_symbolic_is_seeded():
    from draftguide.training.datasources import gsm_symbolic

    a, b = gsm_symbolic(3, seed=1), gsm_symbolic(3, seed=1)
    assert [r["messages"] for r in a] == [r["messages"] for r in b]
    assert all(r["source"] == "gsm" and r["messages"][0]["content"].strip() for r in a)


def test_cl_task_prompts_never_repeat_the_evaluation_suite():
    from draftguide.experiments.tasks import load_builtin_tasks
    from draftguide.training.datasources import load_source

    train = load_source("cltasks:2")
    assert len(train) == 32 and all(r["source"] == "cltasks" for r in train)
    assert all(r["messages"][-1]["role"] == "user" for r in train)  # prompts only, no gold answer turn
    held = {str(t["messages"]) for t in load_builtin_tasks()}
    assert not any(str(r["messages"]) in held for r in train)


def test_sharegpt_later_turns_are_one_turn_chats_of_the_training_part(tmp_path):
    conv = [
        {"from": "human", "value": "q0"},
        {"from": "gpt", "value": "a0"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "x" * 50},  # over max_chars: skipped
        {"from": "gpt", "value": "a2"},
        {"from": "human", "value": "q3"},
        {"from": "gpt", "value": ""},  # empty reply: skipped
        {"from": "human", "value": "q4"},
        {"from": "gpt", "value": "a4"},
    ]
    recs = [{"id": f"c{i}", "conversations": conv} for i in range(3)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(recs))
    rows = sharegpt(path, later_turns=True, max_seen=2, max_chars=20)  # c2 belongs to the held-out part
    assert [r["id"] for r in rows] == ["sharegpt-c0-1", "sharegpt-c0-4", "sharegpt-c1-1", "sharegpt-c1-4"]
    assert rows[0]["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert len(sharegpt(path, later_turns=True, limit=3)) == 3
