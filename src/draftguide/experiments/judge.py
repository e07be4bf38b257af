"""An LLM judge through any OpenAI-compatible endpoint, following CL-bench's grading protocol.

The judge sees the rubrics and the response only (never the context or a gold answer) and answers
JSON: a rationale, a yes/no per rubric, and an overall 0/1 that is 1 only if every rubric is met.
Verdicts in our keys or CL-bench's own (`Grading Rationale`, `List of Requirement Satisfaction Status`,
`Overall Score`) are read, bare, fenced or after reasoning text. Unparseable output is retried (3 tries in
all); still unparseable, it scores 0 with the reason recorded (the judge answered, but with no usable
verdict). An API failure (timeout, connection, HTTP error) is no verdict at all: the task is recorded as
failed (status error), left out of the solve rate and retried by a rerun into the same folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from draftguide.errors import DraftGuideError

DEFAULT_PROMPT = """You are grading a response against a list of rubrics. Judge only what the response says; \
you are not shown the question or its source material, and you must not use your own knowledge of the \
subject to excuse or penalise anything. A rubric is met only if the response clearly satisfies it.

Rubrics:
{rubrics}

Response to grade:
<<<
{response}
>>>

Reply with one JSON object and nothing else, in this form:
{"rationale": "<a few sentences on each rubric>", "rubric_results": ["yes" or "no", one per rubric, in order], \
"overall_score": 1 if every rubric is met, else 0}"""

PLACEHOLDERS = ("{rubrics}", "{response}")


def load_prompt(path: str | Path | None) -> str:
    """The judge prompt: ours, or a user's file (e.g. CL-bench's official text) with both placeholders."""
    if path is None:
        return DEFAULT_PROMPT
    path = Path(path)
    if not path.is_file():
        raise DraftGuideError(f"judge prompt file '{path}' does not exist")
    text = path.read_text(encoding="utf-8-sig")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise DraftGuideError(f"judge prompt file '{path}' lacks the placeholder(s) {', '.join(missing)}")
    return text


def render(template: str, rubrics: list[str], response: str) -> str:
    # str.replace, not str.format: prompt texts contain literal braces (JSON examples)
    listed = "\n".join(f"{i + 1}. {r}" for i, r in enumerate(rubrics))
    return template.replace("{rubrics}", listed).replace("{response}", response)


# verdict keys as judges write them (ours, CL-bench's official prompt, common variants), compared after
# lowercasing and dropping everything but letters and digits
RATIONALE_KEYS = ("rationale", "gradingrationale", "reasoning", "reason", "explanation", "analysis")
RESULTS_KEYS = (
    "rubricresults",
    "listofrequirementsatisfactionstatus",
    "requirementsatisfactionstatus",
    "requirementstatus",
    "rubricstatus",
    "results",
    "satisfactionstatus",
)
OVERALL_KEYS = ("overallscore", "score", "overall", "finalscore")
YES = ("yes", "true", "1", "satisfied", "met", "pass", "passed", "fulfilled", "y")
NO = (
    "no",
    "false",
    "0",
    "notsatisfied",
    "unsatisfied",
    "notmet",
    "fail",
    "failed",
    "notfulfilled",
    "n",
    "partiallysatisfied",
    "partial",
    "partiallymet",
)


def _key(k) -> str:
    return re.sub(r"[^a-z0-9]", "", str(k).lower())


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in `text` (fenced ```json blocks first, then any `{...}` that decodes), in order of
    preference: fenced blocks, then the text's own objects from last to first (reasoning comes before the
    verdict)."""
    dec = json.JSONDecoder()
    found: list[dict] = []
    for block in reversed(re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.S)):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    inline, after = [], 0
    for m in re.finditer(r"\{", text):
        if m.start() < after:
            continue  # inside an object already found: only outermost objects are verdicts
        try:
            obj, after = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        inline.append(obj)
    return found + inline[::-1]


def _word(v) -> bool | None:
    """A yes/no value in the forms judges write (yes/no, true/false, 1/0, satisfied/not satisfied, ...)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, dict):  # {"requirement": ..., "status": "yes"}
        for k, x in v.items():
            if _key(k) in ("status", "satisfied", "met", "result", "verdict", "answer", "satisfactionstatus"):
                return _word(x)
        return None
    w = _key(v)
    return True if w in YES else False if w in NO else None


def _field(obj: dict, names: tuple[str, ...]):
    keys = {_key(k): k for k in obj}
    for n in names:
        if n in keys:
            return obj[keys[n]], True
    return None, False


def parse_verdict(text: str, n_rubrics: int) -> dict:
    """The judge's reply -> {rationale, rubric_results: [bool] or None, score}; ValueError if no verdict is in it.
    Understands our keys (`rationale`, `rubric_results`, `overall_score`) and CL-bench's (`Grading Rationale`,
    `List of Requirement Satisfaction Status`, `Overall Score`), in any case and spacing, as a bare JSON object,
    inside a fenced block, or after reasoning text (a `<think>` block included). The score is all-or-nothing:
    an overall 1 with an unmet rubric is 0; a reply without per-rubric statuses is scored by its overall score."""
    text = re.sub(r"<think>.*?</think>", "", text.strip(), flags=re.S)
    objs = _json_objects(text)
    if not objs:
        raise ValueError("no JSON object in the judge's reply")
    problems = []
    for obj in objs:
        overall, has_overall = _field(obj, OVERALL_KEYS)
        results, has_results = _field(obj, RESULTS_KEYS)
        if not has_overall and not has_results:
            continue
        met = None
        if has_results:
            if isinstance(results, dict):  # {"1": "yes", "2": "no"} or {rubric text: status}
                results = list(results.values())
            if not isinstance(results, list) or len(results) != n_rubrics:
                problems.append(f"expected {n_rubrics} rubric statuses, got {results!r}")
                continue
            met = [_word(r) for r in results]
            if None in met:
                problems.append(f"rubric status {results[met.index(None)]!r} is not yes/no")
                continue
        score = _word(overall) if has_overall else None
        if has_overall and score is None:
            problems.append(f"overall score must be 0 or 1, got {overall!r}")
            continue
        if score is None:
            score = all(met)
        rationale, _ = _field(obj, RATIONALE_KEYS)
        return {
            "rationale": "" if rationale is None else str(rationale),
            "rubric_results": met,
            "score": int(bool(score) and (met is None or all(met))),
        }
    raise ValueError(
        problems[0] if problems else "no verdict in the judge's reply (no overall score or rubric statuses)"
    )


class JudgeUnavailable(Exception):
    """The judge could not be asked (connection, timeout, HTTP or API error): a failed task, not a verdict."""


class LLMJudge:
    """`judge(rubrics, response) -> {score, rubric_results, rationale, tries, error}`; an unparseable reply
    scores 0 with `error` set; a judge that cannot be reached raises `JudgeUnavailable`."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        prompt: str | None = None,
        tries: int = 3,
        api_retries: int = 2,
    ):
        from openai import OpenAI

        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise DraftGuideError("the LLM judge needs an API key: set OPENAI_API_KEY (any value for a local server)")
        if not model:
            raise DraftGuideError("the LLM judge needs --judge-model")
        self.model, self.base_url, self.timeout, self.tries = model, base_url, timeout, tries
        self.prompt = prompt or DEFAULT_PROMPT
        self.client = OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=api_retries)

    def settings(self) -> dict:
        return {
            "judge_model": self.model,
            "judge_base_url": self.base_url,
            "judge_timeout_s": self.timeout,
            "judge_prompt": "default" if self.prompt == DEFAULT_PROMPT else "custom",
        }

    def __call__(self, rubrics: list[str], response: str) -> dict:
        import openai

        if not rubrics:
            return {"score": 0, "rubric_results": [], "rationale": "", "tries": 0, "error": "task has no rubrics"}
        content, errors = render(self.prompt, rubrics, response), []
        for attempt in range(1, self.tries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}], temperature=0
                )
                text = reply.choices[0].message.content or ""
            except openai.OpenAIError as e:  # the client already retried (api_retries); no verdict: a failed task
                raise JudgeUnavailable(
                    f"judge API failure: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from e
            try:
                return parse_verdict(text, len(rubrics)) | {"tries": attempt, "error": None}
            except ValueError as e:
                errors.append(str(e))
        return {
            "score": 0,
            "rubric_results": None,
            "rationale": "",
            "tries": self.tries,
            "error": f"judge output unparseable after {self.tries} tries: {errors[-1]}",
        }
