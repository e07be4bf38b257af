"""Issue 17, kind 9: a UTF-8 byte-order mark is accepted by every JSONL (and JSON) reader."""

import gzip
import json

import pytest

BOM = "\ufeff"


def _write(path, rows, bom=True):
    path.write_text((BOM if bom else "") + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_jsonl_skips_bom(tmp_path):
    from draftguide.modeling.prompts import read_jsonl

    rows = read_jsonl(_write(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}]))
    assert [r["prompt"] for r in rows] == ["x", "y"] and rows[0]["_line"] == 1
    assert not any(k.startswith(BOM) for r in rows for k in r)


def test_bom_prompts_and_tasks(tmp_path):
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.tasks import builtin_tasks_path
    from draftguide.modeling.prompts import load_prompts

    assert load_prompts(str(_write(tmp_path / "p.jsonl", [{"prompt": "hello"}])))[0]["prompt"] == "hello"
    src = builtin_tasks_path().read_text(encoding="utf-8").splitlines()[:2]
    path = tmp_path / "t.jsonl"
    path.write_text(BOM + "\n".join(src) + "\n", encoding="utf-8")
    tasks, bad = load_tasks(str(path))
    assert len(tasks) == 2 and not bad


def test_bom_results_and_samples(tmp_path):
    from draftguide.experiments.diagnose import results_field
    from draftguide.training.data import read_samples

    _write(tmp_path / "results.jsonl", [{"task_id": "a", "status": "ok", "response": "r"}])
    assert results_field(tmp_path / "results.jsonl", "response") == {"a": "r"}
    _write(tmp_path / "samples.jsonl", [{"id": "s", "input_ids": [1, 2], "prompt_len": 1}])
    assert read_samples(tmp_path) == [{"id": "s", "input_ids": [1, 2], "prompt_len": 1}]


def test_bom_gzip_and_json(tmp_path):
    from draftguide.training.datasources import humaneval, mtbench

    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(BOM + json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    assert humaneval(gz)[0]["id"] == "HumanEval-0"
    mt = _write(tmp_path / "q.jsonl", [{"question_id": 81, "category": "writing", "turns": ["Hi", "more"]}])
    assert mtbench(mt)[0]["messages"][0]["content"] == "Hi"


def test_bom_judge_prompt_file(tmp_path):
    from draftguide.experiments.judge import load_prompt

    p = tmp_path / "judge.txt"
    p.write_text(BOM + "Rubrics {rubrics} response {response}", encoding="utf-8")
    assert load_prompt(p).startswith("Rubrics")


@pytest.mark.parametrize("bom", [True, False])
def test_cli_eval_rows_with_bom_are_read(tmp_path, bom):
    """The CLI's own task reader path (load_tasks -> read_jsonl): a BOM at line 1 is no error."""
    from draftguide.experiments.evaluate import load_tasks

    row = {
        "messages": [{"role": "user", "content": "Say hi"}],
        "metadata": {"task_id": "t1"},
        "checks": [{"type": "contains", "value": "hi"}],
    }
    tasks, _ = load_tasks(str(_write(tmp_path / "t.jsonl", [row], bom=bom)))
    assert tasks[0]["metadata"]["task_id"] == "t1"
