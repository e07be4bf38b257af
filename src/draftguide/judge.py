"""An LLM judge through any OpenAI-compatible endpoint, following CL-bench's grading protocol.

The judge sees the rubrics and the response only (never the context or a gold answer) and answers
JSON: a rationale, a yes/no per rubric, and an overall 0/1 that is 1 only if every rubric is met.
Unparseable output is retried (3 tries in all); still unparseable, or an API failure (timeout,
connection, HTTP error), scores 0 and the reason is recorded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import DraftGuideError

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


def parse_verdict(text: str, n_rubrics: int) -> dict:
    """The judge's JSON -> {rationale, rubric_results: [bool], score}; ValueError if it does not fit."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the judge's reply")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"judge reply is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("judge reply is not a JSON object")
    results = obj.get("rubric_results")
    if not isinstance(results, list) or len(results) != n_rubrics:
        raise ValueError(f"expected 'rubric_results' with {n_rubrics} entries, got {results!r}")
    met = []
    for r in results:
        word = str(r).strip().lower()
        if word not in ("yes", "no", "true", "false", "1", "0"):
            raise ValueError(f"rubric result {r!r} is not yes/no")
        met.append(word in ("yes", "true", "1"))
    overall = obj.get("overall_score")
    if overall not in (0, 1, "0", "1"):
        raise ValueError(f"'overall_score' must be 0 or 1, got {overall!r}")
    # all-or-nothing: an overall 1 with an unmet rubric is still 0
    return {"rationale": str(obj.get("rationale", "")), "rubric_results": met, "score": int(int(overall) == 1 and all(met))}


class LLMJudge:
    """`judge(rubrics, response) -> {score, rubric_results, rationale, tries, error}`; never raises for
    API or parse failures (score 0 with `error` set)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 prompt: str | None = None, tries: int = 3, api_retries: int = 2):
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
        return {"judge_model": self.model, "judge_base_url": self.base_url, "judge_timeout_s": self.timeout,
                "judge_prompt": "default" if self.prompt == DEFAULT_PROMPT else "custom"}

    def __call__(self, rubrics: list[str], response: str) -> dict:
        import openai

        if not rubrics:
            return {"score": 0, "rubric_results": [], "rationale": "", "tries": 0, "error": "task has no rubrics"}
        content, errors = render(self.prompt, rubrics, response), []
        for attempt in range(1, self.tries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}], temperature=0)
                text = reply.choices[0].message.content or ""
            except openai.OpenAIError as e:
                return {"score": 0, "rubric_results": None, "rationale": "", "tries": attempt,
                        "error": f"judge API failure: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            try:
                return parse_verdict(text, len(rubrics)) | {"tries": attempt, "error": None}
            except ValueError as e:
                errors.append(str(e))
        return {"score": 0, "rubric_results": None, "rationale": "", "tries": self.tries,
                "error": f"judge output unparseable after {self.tries} tries: {errors[-1]}"}
