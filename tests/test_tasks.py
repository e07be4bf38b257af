"""The built-in suite: deterministic, covers CL-bench's four categories, gold answers pass their own
checks while the tempting wrong answer (the real-world prior, another item of the context) fails them,
and the shipped frozen file is exactly what the generator makes."""

import json

import pytest

from draftguide.app.cli import main
from draftguide.experiments.evaluate import load_tasks, score_checks
from draftguide.experiments.tasks import BUILTIN_PARAMS, CATEGORIES, build_tasks, builtin_tasks_path, load_builtin_tasks

CL_BENCH_CATEGORIES = {
    "Domain Knowledge Reasoning",
    "Rule System Application",
    "Procedural Task Execution",
    "Empirical Discovery & Simulation",
}


@pytest.fixture(scope="module")
def builtin():
    return load_builtin_tasks()


def test_deterministic_and_extendable():
    a = build_tasks(2, seed=5)
    assert a == build_tasks(2, seed=5)
    assert a != build_tasks(2, seed=6)
    assert build_tasks(3, seed=5)[: len(a)] == a  # a larger build extends a smaller one


def test_covers_all_categories_interleaved(builtin):
    assert set(CATEGORIES) == CL_BENCH_CATEGORIES and all(3 <= len(s) <= 4 for s in CATEGORIES.values())
    n_sub = sum(len(s) for s in CATEGORIES.values())
    assert len(builtin) == n_sub * BUILTIN_PARAMS["n_per_subcategory"]
    first = builtin[:n_sub]  # `--limit N` sees every subcategory
    assert {t["metadata"]["sub_category"] for t in first} == {s for subs in CATEGORIES.values() for s in subs}
    assert {t["metadata"]["context_category"] for t in builtin} == CL_BENCH_CATEGORIES
    assert len({t["metadata"]["task_id"] for t in builtin}) == len(builtin)


def test_frozen_file_is_the_generator_output(builtin):
    fresh = build_tasks(**BUILTIN_PARAMS)
    assert [{k: v for k, v in t.items() if k != "_line"} for t in builtin] == fresh


def test_shipped_greedy_results_match_the_frozen_suite(builtin):
    """The greedy solve status shipped for `diagnose --solved-from` was measured on this very suite."""
    from draftguide.modeling.prompts import read_jsonl

    rows = read_jsonl(builtin_tasks_path().parent / "tasks_v1.greedy-smollm2-135m.results.jsonl")
    assert [r["task_id"] for r in rows] == [t["metadata"]["task_id"] for t in builtin]
    assert all(r["status"] == "ok" and r["reference_answer"] == t["reference_answer"] for r, t in zip(rows, builtin))


def test_rows_are_valid_cl_bench_rows():
    tasks, bad = load_tasks("builtin")  # the evaluator's own row checks
    assert bad == [] and len(tasks) == len(load_builtin_tasks())
    for t in tasks:
        assert t["messages"][0]["role"] == "system" and t["messages"][-1]["role"] == "user"
        assert set(t["metadata"]) == {"task_id", "context_id", "context_category", "sub_category"}
        assert t["rubrics"] and t["checks"] and t["reference_answer"]


def test_reference_passes_and_distractor_fails(builtin):
    for t in builtin:
        ref, wrong = t["reference_answer"], t["distractor_answer"]
        assert score_checks(ref, t["checks"])[0], (t["metadata"]["task_id"], ref)
        assert score_checks(f"The answer is {ref}.", t["checks"])[0], t["metadata"]["task_id"]
        assert not score_checks(wrong, t["checks"])[0], (t["metadata"]["task_id"], wrong)
        assert not score_checks("I don't know.", t["checks"])[0]
        assert ref.lower() not in wrong.lower() or not wrong


def test_context_over_prior():
    rows = build_tasks(4, seed=0)
    by_sub = {}
    for t in rows:
        by_sub.setdefault(t["metadata"]["sub_category"], []).append(t)
    for t in by_sub["Counterfactual facts"]:  # the real-world answer is a failing answer
        assert any(c["type"] == "not_contains" and c["value"] == t["distractor_answer"] for c in t["checks"])
        assert f"{t['reference_answer']}" in t["messages"][0]["content"]
    for t in by_sub["Multi-turn follow-up"]:
        assert [m["role"] for m in t["messages"]] == ["system", "user", "assistant", "user"]
    for t in by_sub["Long document retrieval"]:
        ctx = t["messages"][0]["content"]
        pos = ctx.find(f"berth {t['reference_answer']};")
        assert len(ctx) > 2500 and 0.3 < pos / len(ctx) < 0.7  # buried in the middle


def test_negated_or_reversed_answers_fail():
    by_sub = {}
    for t in build_tasks(4, seed=0):
        by_sub.setdefault(t["metadata"]["sub_category"], []).append(t)
    for t in by_sub["Observation log"]:  # "does not glow" is not "glowed"
        stem = t["reference_answer"][:4]
        assert score_checks(f"The liquid {t['reference_answer']}.", t["checks"])[0]
        assert not score_checks(f"The liquid does not {stem}.", t["checks"])[0]
    for t in by_sub["Instruction steps"]:  # the order reversed: "<asked> comes right after the <answer> button"
        ref = t["reference_answer"]
        assert score_checks(f"In the next step you press the {ref} button.", t["checks"])[0]
        assert not score_checks(f"You press that button right after the {ref} button.", t["checks"])[0]
    for t in by_sub["Table comparison"]:  # the sample named first is the answer; the other may follow
        ref, other = t["reference_answer"], t["distractor_answer"]
        assert score_checks(f"Sample {ref} had the higher yield, compared with sample {other}.", t["checks"])[0]
        assert not score_checks(f"Sample {other} had the higher yield, not sample {ref}.", t["checks"])[0]


def test_cli_build(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["tasks", "build", "--out", str(out), "--n-per-subcategory", "2", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == build_tasks(2, 3) and "32 tasks" in capsys.readouterr().out
    assert builtin_tasks_path().is_file()
