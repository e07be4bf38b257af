"""Error taxonomy: hand-made responses land in the right class; eval records it; flip tables count it."""

import json

import pytest

from conftest import char_tokenizer, tiny_target
from draftguide.app.cli import main
from draftguide.experiments.evaluate import METHODS, score_checks
from draftguide.experiments.taxonomy import (
    CLASSES,
    class_counts,
    classify_response,
    flip_markdown,
    flip_table,
    mentions,
)


def _row(tid, context, question, ref, dis, checks, cat="Cat"):
    return {
        "messages": [{"role": "system", "content": context}, {"role": "user", "content": question}],
        "rubrics": ["r"],
        "reference_answer": ref,
        "distractor_answer": dis,
        "checks": checks,
        "metadata": {"task_id": tid, "context_id": f"{tid}-ctx", "context_category": cat, "sub_category": "S"},
    }


# the prior (Paris) is not in the context; the numbers task's distractor (the neighbour's berth) is
CAPITAL = _row(
    "cap",
    "In this world, the capital of France is Lyon. In this world, the sky is green.",
    "What is the capital of France? Answer with only the answer.",
    "Lyon",
    "Paris",
    [{"type": "contains", "value": "Lyon"}, {"type": "not_contains", "value": "Paris"}],
)
BERTH = _row(
    "berth",
    "The ship Vel is moored at berth 431. The ship Tar is moored at berth 512. The ship Oki is at berth 77.",
    "At which berth is the ship Vel moored? Answer with only the berth number.",
    "431",
    "512",
    [{"type": "regex", "value": r"(?<![\d.])431(?!\.?\d)"}],
)
OPERATOR = _row(
    "op",
    "For any numbers a and b, a ◇ b = 2*a + b.",
    "Compute 3 ◇ 4. Answer with only the number.",
    "10",
    "7",
    [{"type": "regex", "value": r"(?<![\d.])10(?!\.?\d)"}],
)
STEPS = _row(
    "steps",
    "1. Press the amber button.\n2. Press the teal button.\n3. Press the violet button.",
    "Which button do you press right after the teal button? Answer with only the colour.",
    "violet",
    "amber",
    [{"type": "contains", "value": "violet"}, {"type": "not_contains", "value": "amber"}],
)


def _cls(task, response):
    _, details = score_checks(response, task["checks"])
    return classify_response(response, task, {"checks": details})


def test_hand_made_responses():
    cases = [
        (CAPITAL, "Paris", "prior"),
        (CAPITAL, "The capital of France is Paris.", "prior"),
        (CAPITAL, "Lyon, or Paris in the real world", "partial"),  # the reference and a forbidden item
        (CAPITAL, "green", "context_item"),  # another item of the context
        (CAPITAL, "Berlin", "other"),
        (CAPITAL, "", "no_answer"),
        (CAPITAL, "  ...  ", "no_answer"),
        (CAPITAL, "I don't know.", "no_answer"),
        (BERTH, "512", "context_item"),  # the distractor, and it is in the context
        (BERTH, "77", "context_item"),  # another number of the context
        (BERTH, "4310", "other"),  # no number of the context (431 only inside a longer number)
        (OPERATOR, "7", "prior"),  # a + b: the usual reading, nowhere in the prompt
        (OPERATOR, "3", "context_item"),  # echoes an operand
        (OPERATOR, "11", "other"),
        (STEPS, "amber", "context_item"),
        (STEPS, "violet, then amber", "partial"),
        (STEPS, "teal", "context_item"),  # the item the question names
        (STEPS, "crimson", "other"),
    ]
    for task, resp, want in cases:
        assert _cls(task, resp) == want, (task["metadata"]["task_id"], resp, _cls(task, resp))


def test_mentions_is_whole_word():
    assert mentions("berth 431.", "431") and not mentions("berth 4310", "431") and not mentions("1.431", "431")
    assert mentions("It is Lyon!", "lyon") and not mentions("Lyonnaise", "Lyon")
    assert mentions("use seaweed  ash", "seaweed ash")


def test_llm_judged_rows_use_rubrics():
    task = {k: v for k, v in CAPITAL.items() if k != "checks"}
    assert classify_response("Lyon is it, though Paris", task, {"rubric_results": [True, False]}) == "partial"
    assert classify_response("Paris", task, {"rubric_results": [False, False]}) == "prior"


def _canned(responses):
    """An eval method that answers each task with a fixed text (found by its context in the prompt)."""

    def method(target, tok, ids, max_new_tokens, stop, **opts):
        prompt = tok.decode(ids[0])
        text = next(r for key, r in responses.items() if key in prompt)
        return tok.encode(text, add_special_tokens=False)

    return method


@pytest.fixture(scope="module")
def fused_target_dir(tmp_path_factory):
    """A tiny target whose char tokenizer decodes without spaces between characters (responses read as written)."""
    from tokenizers import decoders

    path = tmp_path_factory.mktemp("fused-target")
    tiny_target("qwen3").save_pretrained(path)
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()
    tok.save_pretrained(path)
    return path


def _run(tmp_path, fused_target_dir, monkeypatch, name, responses):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in (CAPITAL, BERTH, OPERATOR, STEPS)))
    monkeypatch.setitem(METHODS, "greedy", _canned(responses))
    out = tmp_path / name
    assert (
        main(
            [
                "eval",
                "--target",
                str(fused_target_dir),
                "--tasks",
                str(tasks),
                "--out",
                str(out),
                "--max-new-tokens",
                "40",
            ]
        )
        == 0
    )
    return (
        out,
        [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()],
        json.loads((out / "summary.json").read_text()),
    )


def test_eval_records_classes_and_flip_table(tmp_path, fused_target_dir, monkeypatch, capsys):
    base, rows_a, sa = _run(
        tmp_path,
        fused_target_dir,
        monkeypatch,
        "greedy",
        {"capital of France is Lyon": "Paris", "ship Vel": "512", "2*a": "10", "amber button": "amber"},
    )
    assert [r.get("error_class") for r in rows_a] == ["prior", "context_item", None, "context_item"]
    ec = sa["error_classes"]
    assert ec["n_failed"] == 3 and ec["counts"] == {
        "prior": 1,
        "context_item": 2,
        "no_answer": 0,
        "partial": 0,
        "other": 0,
    }
    assert ec["categories"]["Cat"]["n_failed"] == 3
    assert "prior 1, context_item 2" in capsys.readouterr().out
    other, rows_b, _ = _run(
        tmp_path,
        fused_target_dir,
        monkeypatch,
        "guided",
        {"capital of France is Lyon": "Lyon", "ship Vel": "512", "2*a": "7", "amber button": "violet"},
    )
    t = flip_table(rows_a, rows_b)
    assert t["n_tasks"] == 4
    assert t["per_class"]["prior"] == {
        "base": 1,
        "fixed": 1,
        "fix_rate": 1.0,
        "stayed": 0,
        "moved": 0,
        "caused": 1,
        "other": 1,
    }
    assert t["per_class"]["context_item"]["fixed"] == 1 and t["per_class"]["context_item"]["stayed"] == 1
    assert t["matrix"]["solved"]["prior"] == 1 and t["fixed"] == 2 and t["caused"] == 1 and t["net"] == 1
    md = flip_markdown(t, "greedy", "guided")
    assert "| prior | 1 | 1 | 1.00 |" in md and "greedy \\ guided" in md
    # runs written before the taxonomy: classified from the task rows
    old = [{k: v for k, v in r.items() if k != "error_class"} for r in rows_a]
    assert flip_table(old, rows_b, tasks=[CAPITAL, BERTH, OPERATOR, STEPS])["matrix"] == t["matrix"]
    assert class_counts(old)["n_unclassified"] == 3
    # the command
    assert main(["flips", "--base", str(base), "--other", str(other), "--out", str(tmp_path / "flips")]) == 0
    s = json.loads((tmp_path / "flips" / "flips.json").read_text())
    assert s["fixed"] == 2 and s["caused"] == 1 and set(s["per_class"]) == set(CLASSES)
    assert "fixed by" in (tmp_path / "flips" / "flips.md").read_text()
