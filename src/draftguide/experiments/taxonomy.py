"""Error taxonomy of failed context-learning responses, and flip tables between two eval runs.

Every failed response (score 0) gets exactly one class, by the first rule that applies:

1. `no_answer`: wrong format or no answer: nothing alphanumeric, or a refusal / "I don't know".
2. `partial`: partially right: the reference is there (every positive check, `contains` / `regex`, passes; for
   LLM-judged rows: some but not all rubrics are met), yet the response fails (it also names a forbidden item,
   or negates the answer).
3. `prior`: reverted to the prior: the response names the task's `distractor_answer` where that answer does
   not occur in the prompt (the real-world fact a counterfactual overrides, the usual reading of an operator).
4. `context_item`: picked another item of the context: the response names the distractor where the prompt
   holds it, a forbidden (`not_contains`) value, a number of the prompt, or a content word of the prompt
   (three letters or more, not a common English or instruction word) other than the reference.
5. `other`: none of the above (e.g. a wrong number that occurs nowhere, a made-up word).

Matching is case-insensitive and whole-word (a number never matches inside a longer number).
`flip_table` compares two runs task by task (e.g. greedy vs guided): a matrix of outcomes (`solved` or a
class) of the base run against the other, and per class how many failures the other run fixes and how
many it causes: the decision-matrix report's question "which failure classes guidance fixes and which it
causes".
"""

from __future__ import annotations

import re
from collections import Counter

CLASSES = ("prior", "context_item", "no_answer", "partial", "other")
SOLVED = "solved"
OUTCOMES = (SOLVED, *CLASSES)
POSITIVE_CHECKS = ("contains", "regex")
REFUSAL = re.compile(
    r"\b(i\s+(?:do\s+not|don't|cannot|can't)\s+know|not\s+sure|unable\s+to|cannot\s+(?:answer|determine|be\s+determined)|"
    r"can't\s+(?:answer|determine)|no\s+(?:information|answer)|not\s+(?:mentioned|specified|provided|given))\b",
    re.I,
)
STOPWORDS = frozenset(
    """
a an the and or but if then than so of to in on at by for with from into onto over under about after before between
is are was were be been being am do does did done has have had having not no yes it its this that these those there
here which what who whom whose when where why how all any each every some one two three first second last next only
just also very more most less least many much other another same such own as up down out off again once i you he she
we they me him her us them my your his our their answer answers answered answering number numbers name names word
words only final result results according based following follow given give gives please respond response question
questions use used using per can could would should will shall may might must like new now get gets got true false
fact facts world this that let lets say says said note notes see step steps rule rules
""".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’][^\W_]+)?", text.lower())


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?!\.?\d)", text))


def mentions(text: str, item) -> bool:
    """`item` (a word, name, phrase or number) occurs in `text` as a whole word, case-insensitively."""
    item = str(item).strip()
    if not item:
        return False
    if re.fullmatch(r"\d+(?:\.\d+)?", item):
        return item in _numbers(text)
    pat = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in item.split()) + r"(?![^\W_])"
    return re.search(pat, text, flags=re.I) is not None


def prompt_text(task: dict) -> str:
    """Every message of the task (system, earlier turns and the question), joined."""
    return "\n".join(m.get("content", "") for m in task.get("messages", []))


def _reference_given(response: str, task: dict, row: dict | None) -> bool | None:
    """Whether the positive checks (or, for an LLM-judged row, some rubrics) say the reference is there."""
    details = (row or {}).get("checks")
    if not isinstance(details, list) or not details:
        from draftguide.experiments.evaluate import score_checks

        details = score_checks(response, task["checks"])[1] if task.get("checks") else []
    pos = [d for d in details if d.get("type") in POSITIVE_CHECKS]
    if pos:
        return all(d["passed"] for d in pos)
    rubric = (row or {}).get("rubric_results")
    if isinstance(rubric, list) and rubric:
        return any(bool(x) for x in rubric)
    ref = task.get("reference_answer")
    return mentions(response, ref) if ref else None


def context_items(task: dict) -> set[str]:
    """Candidate answers the prompt offers: its numbers and content words (lower case), the distractor and the
    forbidden values of the checks."""
    text = prompt_text(task)
    items = {w for w in _words(text) if len(w) >= 3 and w not in STOPWORDS and not w.isdigit()} | _numbers(text)
    extra = [task.get("distractor_answer")] + [
        c["value"] for c in task.get("checks", []) if c.get("type") == "not_contains"
    ]
    return items | {str(x).lower() for x in extra if x is not None and mentions(text, x)}


def classify_response(response: str, task: dict, row: dict | None = None) -> str:
    """The class (one of `CLASSES`) of a failed `response` to `task` (a suite row with `messages`,
    `reference_answer`, `distractor_answer`, `checks`); `row` is its eval result row, whose check details or
    rubric results are used when there. See the module docstring for the rules."""
    response = response or ""
    if not re.search(r"[^\W_]", response) or REFUSAL.search(response):
        return "no_answer"
    if _reference_given(response, task, row):
        return "partial"
    text, ref, dis = prompt_text(task), task.get("reference_answer"), task.get("distractor_answer")
    if dis is not None and mentions(response, dis) and not (ref is not None and str(dis).lower() == str(ref).lower()):
        return "context_item" if mentions(text, dis) else "prior"
    ref_words = set(_words(str(ref))) if ref is not None else set()
    said = (set(_words(response)) | _numbers(response)) - ref_words
    items = context_items(task)
    if said & items or any(" " in i and mentions(response, i) for i in items):
        return "context_item"
    return "other"


def classify_row(row: dict, task: dict) -> str | None:
    """The outcome of an eval result row: `solved`, a failure class, or None (not finished, no score)."""
    if row.get("status", "ok") != "ok" or row.get("score") is None:
        return None
    if int(row["score"]):
        return SOLVED
    return classify_response(row.get("response", ""), task, row)


def class_counts(rows: list[dict]) -> dict:
    """Failure classes of finished rows (their `error_class`): counts and shares of the classified failures, overall
    and per category; rows written before the taxonomy (no `error_class`) are counted as `n_unclassified`."""
    failed = [r for r in rows if r.get("status", "ok") == "ok" and r.get("score") is not None and not int(r["score"])]

    def block(rs):
        c = Counter(r.get("error_class") for r in rs)
        n = len(rs) - c.get(None, 0)
        return {
            "n_failed": len(rs),
            "n_unclassified": c.get(None, 0),
            "counts": {k: c.get(k, 0) for k in CLASSES},
            "shares": {k: (c.get(k, 0) / n if n else None) for k in CLASSES},
        }

    out = block(failed)
    cats: dict[str, list] = {}
    for r in failed:
        cats.setdefault(r.get("context_category", "(none)"), []).append(r)
    out["categories"] = {c: block(v) for c, v in sorted(cats.items())}
    return out


def outcomes(rows: list[dict], tasks: dict[str, dict] | None = None) -> dict[str, str]:
    """task_id -> outcome of finished rows: the row's `error_class` (or `solved`), else classified with `tasks`
    (task_id -> suite row), for runs written before the taxonomy."""
    out = {}
    for r in rows:
        tid = r.get("task_id")
        if tid is None or r.get("status", "ok") != "ok" or r.get("score") is None:
            continue
        if int(r["score"]):
            out[tid] = SOLVED
        elif r.get("error_class") in CLASSES:
            out[tid] = r["error_class"]
        elif tasks is not None and tid in tasks:
            out[tid] = classify_row(r, tasks[tid])
        else:
            out[tid] = "other"
    return out


def flip_table(base_rows: list[dict], other_rows: list[dict], tasks: list[dict] | None = None) -> dict:
    """Task-by-task comparison of two eval runs (e.g. greedy = base, guided = other) over the tasks both finished.
    Returns {"n_tasks", "matrix": {base outcome: {other outcome: n}}, "per_class": {class: {"base": n failed in
    the class in the base run, "fixed": of those solved by the other, "fix_rate", "moved": of those failing in
    another class, "caused": tasks the base solves and the other fails in this class, "other": n in the class
    in the other run}}, "fixed", "caused", "net"} with outcomes `solved` or a class of `CLASSES`."""
    by_id = {t["metadata"]["task_id"]: t for t in tasks} if tasks else None
    a, b = outcomes(base_rows, by_id), outcomes(other_rows, by_id)
    common = [t for t in a if t in b]
    matrix = {x: {y: 0 for y in OUTCOMES} for x in OUTCOMES}
    for t in common:
        matrix[a[t]][b[t]] += 1
    per = {}
    for c in CLASSES:
        base_n = sum(matrix[c].values())
        fixed = matrix[c][SOLVED]
        per[c] = {
            "base": base_n,
            "fixed": fixed,
            "fix_rate": fixed / base_n if base_n else None,
            "stayed": matrix[c][c],
            "moved": base_n - fixed - matrix[c][c],
            "caused": matrix[SOLVED][c],
            "other": sum(matrix[x][c] for x in OUTCOMES),
        }
    fixed = sum(p["fixed"] for p in per.values())
    caused = sum(p["caused"] for p in per.values())
    return {
        "n_tasks": len(common),
        "matrix": matrix,
        "per_class": per,
        "fixed": fixed,
        "caused": caused,
        "net": fixed - caused,
    }


def flip_markdown(table: dict, base: str = "base", other: str = "other") -> str:
    """The flip table as markdown: per class what `other` fixes and causes, then the full outcome matrix."""
    lines = [
        f"| failure class | failing under {base} | fixed by {other} | fix rate | stays in class | moves class | "
        f"caused by {other} (solved under {base}) | failing under {other} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, p in table["per_class"].items():
        rate = "-" if p["fix_rate"] is None else f"{p['fix_rate']:.2f}"
        lines.append(
            f"| {c} | {p['base']} | {p['fixed']} | {rate} | {p['stayed']} | {p['moved']} | {p['caused']} | "
            f"{p['other']} |"
        )
    lines.append(
        f"| **all** | {sum(p['base'] for p in table['per_class'].values())} | {table['fixed']} | | | | "
        f"{table['caused']} | "
        f"{sum(p['other'] for p in table['per_class'].values())} |"
    )
    lines += [
        "",
        f"Outcome matrix over {table['n_tasks']} tasks both runs finished (rows: {base}, columns: {other}):",
        "",
        "| " + base + " \\ " + other + " | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]
    for x in OUTCOMES:
        lines.append(f"| {x} | " + " | ".join(str(table["matrix"][x][y]) for y in OUTCOMES) + " |")
    return "\n".join(lines)


__all__ = [
    "CLASSES",
    "OUTCOMES",
    "class_counts",
    "classify_response",
    "classify_row",
    "flip_markdown",
    "flip_table",
    "mentions",
    "outcomes",
]
