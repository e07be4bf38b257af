"""Issue 17, kinds 5 and 6: verdicts in the shapes judges really write are read; a judge that cannot be
reached makes a failed task (retried on rerun), never a 0."""

import json

import pytest

from draftguide.experiments.judge import JudgeUnavailable, parse_verdict

CLBENCH = {
    "Grading Rationale": "Both requirements are met.",
    "List of Requirement Satisfaction Status": ["yes", "yes"],
    "Overall Score": 1,
}
OURS = {"rationale": "r", "rubric_results": ["yes", "no"], "overall_score": 0}


@pytest.mark.parametrize(
    "text, score, met",
    [
        (json.dumps(CLBENCH), 1, [True, True]),  # CL-bench's own output keys
        (json.dumps(OURS), 0, [True, False]),  # ours
        ("```json\n" + json.dumps(CLBENCH) + "\n```", 1, [True, True]),  # a fenced block
        (
            "Let me check each {requirement} in turn. The first is met; so is the second.\n\n" + json.dumps(CLBENCH),
            1,
            [True, True],
        ),
        ("<think>hmm {not json}</think>Verdict: " + json.dumps(CLBENCH) + " That is all.", 1, [True, True]),
        (
            "Reasoning...\n```\n"
            + json.dumps(
                {
                    "Grading Rationale": "x",
                    "List of Requirement Satisfaction Status": ["Yes", "No"],
                    "Overall Score": "0",
                }
            )
            + "\n```",
            0,
            [True, False],
        ),
        (
            json.dumps({"overall score": 1, "requirement satisfaction status": ["satisfied", "Satisfied"]}),
            1,
            [True, True],
        ),
        (json.dumps({"Overall Score": 1}), 1, None),  # overall only: scored by it
        (
            json.dumps(
                {"Grading Rationale": "x", "List of Requirement Satisfaction Status": ["yes", "no"], "Overall Score": 1}
            ),
            0,
            [True, False],
        ),  # all-or-nothing
        (
            json.dumps(
                {
                    "rubric_results": [{"requirement": "a", "status": "yes"}, {"requirement": "b", "status": "yes"}],
                    "overall_score": 1,
                }
            ),
            1,
            [True, True],
        ),
    ],
)
def test_verdict_shapes(text, score, met):
    v = parse_verdict(text, 2)
    assert v["score"] == score and v["rubric_results"] == met


def test_nested_score_is_not_the_verdict():
    text = json.dumps(
        {"Overall Score": 0, "List of Requirement Satisfaction Status": [{"status": "yes", "score": 1}, "no"]}
    )
    assert parse_verdict(text, 2)["score"] == 0


@pytest.mark.parametrize(
    "text",
    [
        "no json here",
        '{"foo": 1}',
        json.dumps({"Overall Score": 7}),
        json.dumps({"rubric_results": ["yes"], "overall_score": 1}),
    ],
)
def test_unusable_replies_raise(text):
    with pytest.raises(ValueError):
        parse_verdict(text, 2)


def test_unreachable_judge_raises():
    from draftguide.experiments.judge import LLMJudge

    j = LLMJudge("m", base_url="http://127.0.0.1:9/v1", api_key="x", timeout=2, api_retries=0)
    with pytest.raises(JudgeUnavailable, match="judge API failure"):
        j(["be short"], "ok")


class FlakyJudge:
    """Down on the first run, up on the second; same settings both times (a rerun resumes)."""

    def __init__(self, up: bool):
        self.up = up

    def settings(self):
        return {"judge_model": "fake"}

    def __call__(self, rubrics, response):
        if not self.up:
            raise JudgeUnavailable("judge API failure: APIConnectionError: Connection error.")
        return {"score": 1, "rubric_results": [True] * len(rubrics), "rationale": "ok", "tries": 1, "error": None}


def test_judge_down_is_a_failed_task_retried_on_rerun(tmp_path, qwen3_pair):
    from conftest import char_tokenizer
    from draftguide.experiments.evaluate import run_eval

    t, _ = qwen3_pair
    tok = char_tokenizer()
    tasks = [
        {
            "messages": [{"role": "user", "content": f"task {i}"}],
            "metadata": {"task_id": f"t{i}"},
            "rubrics": ["anything"],
            "_line": i + 1,
        }
        for i in range(2)
    ]
    s = run_eval(t, tok, tasks, tmp_path, max_new_tokens=3, judge="llm", llm_judge=FlakyJudge(False), progress=False)
    assert s["n_errors"] == 2 and s["n"] == 0  # no 0 scores: failed tasks, out of the rate
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "error" and r["score"] is None and "judge API failure" in r["error"] for r in rows)
    assert all(isinstance(r["response"], str) for r in rows)  # the response is kept for inspection
    s = run_eval(t, tok, tasks, tmp_path, max_new_tokens=3, judge="llm", llm_judge=FlakyJudge(True), progress=False)
    assert s["n_errors"] == 0 and s["n"] == 2 and s["solve_rate"] == 1.0
