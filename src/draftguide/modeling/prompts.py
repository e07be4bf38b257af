"""Prompt files (JSONL rows with `messages` or `prompt`) and how they become token ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftguide.errors import DraftGuideError

# A few everyday chat requests for `speculate --prompts builtin` (the demo).
BUILTIN_PROMPTS = [
    {
        "id": "builtin-0",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    },
    {
        "id": "builtin-1",
        "messages": [{"role": "user", "content": "Write a Python function that returns the sum of a list of numbers."}],
    },
    {
        "id": "builtin-2",
        "messages": [{"role": "user", "content": "Give me three tips for staying focused while studying."}],
    },
    {"id": "builtin-3", "messages": [{"role": "user", "content": "Explain what photosynthesis is to a ten-year-old."}]},
    {"id": "builtin-4", "messages": [{"role": "user", "content": "List the days of the week."}]},
]


def read_jsonl(path: str | Path, bad: list | None = None, line_numbers: bool = True) -> list[dict]:
    """Rows of a JSONL file (every JSONL reader of the package comes here); a malformed line raises an error
    naming its line number, or, when a list `bad` is given, is appended to it as `(line_number, message)` and
    skipped. A UTF-8 byte-order mark (Windows editors write one) is accepted. `line_numbers`: each row gets
    its line as `_line` (unless it has one)."""
    path = Path(path)
    if not path.is_file():
        raise DraftGuideError(f"file '{path}' does not exist")
    rows = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, msg = None, f"{path}:{n}: not valid JSON ({e.msg})"
            else:
                msg = f"{path}:{n}: each line must be a JSON object"
            if not isinstance(row, dict):
                if bad is None:
                    raise DraftGuideError(msg)
                bad.append((n, msg))
                continue
            if line_numbers:
                row.setdefault("_line", n)
            rows.append(row)
    return rows


def open_text(path: str | Path):
    """A UTF-8 text file for reading, a leading byte-order mark skipped (gzip-compressed if it ends in .gz)."""
    if str(path).endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def load_prompts(source: str) -> list[dict]:
    if source == "builtin":
        return [dict(r) for r in BUILTIN_PROMPTS]
    rows = read_jsonl(source)
    if not rows:
        raise DraftGuideError(f"prompt file '{source}' has no rows")
    for i, r in enumerate(rows):
        r.setdefault("id", f"{Path(source).stem}-{i}")
    return rows


def place(row: dict) -> str:
    """Where a prompt row came from, for error messages: its line, task id or prompt id (or 'prompt')."""
    parts = [f"line {row['_line']}"] if "_line" in row else []
    meta = row.get("metadata")
    if isinstance(meta, dict) and meta.get("task_id"):
        parts.append(f"task {meta['task_id']!r}")
    elif row.get("id") is not None:
        parts.append(f"prompt {row['id']!r}")
    return ", ".join(parts) or row.get("_where", "prompt")


def encode_prompt(
    tokenizer, row: dict, where: str | None = None, chat_template_kwargs: dict | None = None
) -> torch.Tensor:
    """`messages` -> chat template with the generation prompt; `prompt` -> raw text. Returns [1, T].
    `chat_template_kwargs`: extra variables the template reads (the vLLM/SGLang convention, e.g.
    {"enable_thinking": false} for Qwen3). Errors name `where` (default: `place(row)`) and the message at fault."""
    where = where or place(row)
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DraftGuideError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise DraftGuideError(f"{where}: messages[{i}] must be a {{role, content}} object, got {str(m)[:60]!r}")
        if not any(str(m.get("content") or "").strip() for m in msgs):
            which = (
                "messages[0].content is"
                if len(msgs) == 1
                else f"every message's content (messages[0..{len(msgs) - 1}]) is"
            )
            raise DraftGuideError(f"{where}: empty prompt: {which} empty or whitespace")
        if tokenizer.chat_template is None:
            raise DraftGuideError(f"{where}: the tokenizer has no chat template; use a raw 'prompt' instead")
        ids = apply_chat_template(tokenizer, msgs, chat_template_kwargs, add_generation_prompt=True)
    elif "prompt" in row:
        if not str(row["prompt"]).strip():
            raise DraftGuideError(f"{where}: empty prompt: 'prompt' is empty or whitespace")
        ids = tokenizer(str(row["prompt"]))["input_ids"]
    else:
        raise DraftGuideError(f"{where}: a row needs 'messages' or 'prompt'")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise DraftGuideError(f"{where}: empty prompt (no tokens)")
    return ids


RESERVED_TEMPLATE_KWARGS = (
    "conversation",
    "messages",
    "tokenize",
    "return_dict",
    "add_generation_prompt",
    "tools",
    "documents",
    "continue_final_message",
    "return_tensors",
)


def check_chat_template_kwargs(value) -> dict:
    """A JSON object string or a dict of template variables -> the dict (an error names what is wrong)."""
    import json as _json

    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = _json.loads(value)
        except _json.JSONDecodeError as e:
            raise DraftGuideError(f"chat_template_kwargs: not valid JSON ({e.msg}): {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise DraftGuideError(f"chat_template_kwargs must be a JSON object, got {type(value).__name__}")
    bad = sorted(set(value) & set(RESERVED_TEMPLATE_KWARGS))
    if bad:
        raise DraftGuideError(f"chat_template_kwargs may not set {', '.join(bad)} (set by draftguide itself)")
    return dict(value)


TEMPLATE_KWARGS_ATTR = "draftguide_chat_template_kwargs"


def set_chat_template_kwargs(tokenizer, value) -> dict:
    """Make `value` (a JSON object string or a dict) the template variables every later `apply_chat_template`
    of this tokenizer uses (`--chat-template-kwargs`: one setting reaches every command's prompts); per-call
    variables override them. Returns the dict."""
    kw = check_chat_template_kwargs(value)
    setattr(tokenizer, TEMPLATE_KWARGS_ATTR, kw)
    return kw


def apply_chat_template(
    tokenizer, messages: list, chat_template_kwargs: dict | None = None, *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, with extra template variables: the
    tokenizer's own (`set_chat_template_kwargs`), then `chat_template_kwargs` over them (every place a chat
    template is applied comes here)."""
    kw = dict(getattr(tokenizer, TEMPLATE_KWARGS_ATTR, None) or {}) | check_chat_template_kwargs(chat_template_kwargs)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **kw
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def max_positions(model) -> int | None:
    """The model's position limit (`max_position_embeddings` of its config), or None when it has none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_length(model, n_tokens: int, max_new_tokens: int = 0, where: str = "prompt", what: str = "prompt") -> None:
    """The one length check of every place a prompt (or a context, or a scored sequence) enters a model:
    `n_tokens` + `max_new_tokens` must fit the target's `max_position_embeddings`, or a DraftGuideError
    names `where`, the lengths and the limit (nothing is truncated silently; shorten the input or ask for
    fewer new tokens)."""
    limit = max_positions(model)
    if limit is None or n_tokens + max_new_tokens <= limit:
        return
    if n_tokens > limit or not max_new_tokens:
        raise DraftGuideError(
            f"{where}: the {what} has {n_tokens} tokens, more than the target's {limit} positions "
            f"(max_position_embeddings); shorten it"
        )
    raise DraftGuideError(
        f"{where}: the {what} has {n_tokens} tokens and {max_new_tokens} new tokens are asked for, "
        f"{n_tokens + max_new_tokens} in all, more than the target's {limit} positions "
        f"(max_position_embeddings); shorten the {what} or ask for at most {limit - n_tokens} new tokens"
    )


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config (chat models often end on a turn token)."""
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)
