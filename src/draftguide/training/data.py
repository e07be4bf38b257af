"""Training data for drafts: the target's own responses to prompts (the DFlash recipe), or given text.

`DIR/samples.jsonl`: one row per prompt, `{"id", "source", "input_ids", "prompt_len"}`; the loss mask is
`position >= prompt_len` (response tokens only). Appended and flushed per batch, so a rerun with the
same DIR skips prompts already done (resume) and an interrupted run loses at most one batch.

`make_text_data` takes text that already exists (a conversation's own assistant reply, or raw text) and
only tokenizes it: no generation. With a distillation teacher (`train-draft --loss kd|mix`) the target's
own next-token distribution on that text is the label, so any text is usable at the cost of one target
forward per sequence at training time instead of token-by-token generation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from draftguide.errors import DraftGuideError
from draftguide.modeling.prompts import check_length, encode_prompt, place, stop_token_ids
from draftguide.reporting.runs import JsonlWriter, write_json

SAMPLES = "samples.jsonl"


def read_samples(data_dir: str | Path) -> list[dict]:
    path = Path(data_dir) / SAMPLES
    if not path.is_file():
        raise DraftGuideError(f"no {SAMPLES} in '{data_dir}': run `draftguide make-data` first")
    from draftguide.modeling.prompts import read_jsonl

    return read_jsonl(
        path, bad=[], line_numbers=False
    )  # a line cut by a crash mid-write: that prompt is redone on resume


def encode_conversation(tokenizer, row: dict, max_tokens: int | None = None) -> tuple[list[int], int] | None:
    """`(input_ids, prompt_len)` of a row whose `messages` end with an assistant turn (the chat template over
    all turns; the loss covers the last reply) or of a raw `text` row (all but the first token are labels).
    None when the row has no usable reply. Cut to `max_tokens`."""
    from draftguide.modeling.prompts import encode_prompt

    if "text" in row:
        ids = tokenizer(str(row["text"]))["input_ids"]
        n_prompt = 1
    else:
        msgs = row.get("messages") or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant" or not str(msgs[-1].get("content", "")).strip():
            return None
        prompt = encode_prompt(tokenizer, {**row, "messages": msgs[:-1]})[0].tolist()
        from draftguide.modeling.prompts import apply_chat_template

        ids = apply_chat_template(tokenizer, msgs, add_generation_prompt=False)
        if ids[: len(prompt)] != prompt:  # a template that rewrites earlier turns: reply tokens after the prompt
            ids = prompt + tokenizer(str(msgs[-1]["content"]), add_special_tokens=False)["input_ids"]
        n_prompt = len(prompt)
    ids = ids[:max_tokens] if max_tokens else ids
    return (ids, n_prompt) if len(ids) - n_prompt >= 2 else None


def make_text_data(
    tokenizer, rows: list[dict], out_dir: str | Path, *, max_tokens: int = 1024, progress: bool = True
) -> dict:
    """Samples from given text (see `encode_conversation`); resumable like `make_data`. Returns meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_samples(out_dir)} if (out_dir / SAMPLES).is_file() else set()
    t0, n_new = time.perf_counter(), 0
    with JsonlWriter(out_dir / SAMPLES) as w:
        for row in tqdm(rows, desc="make-data (text)", disable=not progress):
            if row["id"] in done:
                continue
            enc = encode_conversation(tokenizer, row, max_tokens)
            if enc is not None:
                w.write(
                    {
                        "id": row["id"],
                        "source": row.get("source"),
                        "input_ids": enc[0],
                        "prompt_len": enc[1],
                        "text": "given",
                    }
                )
                n_new += 1
    return _write_meta(
        out_dir,
        {
            "responses": "given text (teacher-forced)",
            "max_tokens": max_tokens,
            "new_this_run": n_new,
            "seconds_this_run": time.perf_counter() - t0,
        },
    )


def _row_seed(seed: int, row_id) -> int:
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(str(row_id).encode())) % 2**63


def _write_meta(out_dir: Path, extra: dict) -> dict:
    rows = read_samples(out_dir)
    meta = {
        "n_samples": len(rows),
        "n_response_tokens": sum(len(r["input_ids"]) - r["prompt_len"] for r in rows),
        "sources": sorted({r.get("source") or "?" for r in rows}),
    } | extra
    write_json(out_dir / "meta.json", meta)
    return meta


@torch.inference_mode()
def make_data(
    target,
    tokenizer,
    prompts: list[dict],
    out_dir: str | Path,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 32,
    max_prompt_tokens: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_samples(out_dir)} if (out_dir / SAMPLES).is_file() else set()
    todo = []
    for row in prompts:
        if row["id"] in done:
            continue
        ids = encode_prompt(tokenizer, row)[0]
        if ids.numel() <= max_prompt_tokens:  # longer prompts are left out (--max-prompt-tokens); kept ones must fit
            check_length(target, ids.numel(), max_new_tokens, place(row))
            todo.append((row, ids))
    todo.sort(key=lambda x: x[1].numel())  # similar lengths per batch: less left-padding
    stop = stop_token_ids(tokenizer, target)
    from draftguide.decode.batched import batch_generate
    from draftguide.modeling.sampling import check_sampling, effective_temperature

    check_sampling(temperature)
    temperature = effective_temperature(temperature)  # a tiny temperature is greedy
    if batch_size < 1:
        raise DraftGuideError(f"batch_size must be >= 1, got {batch_size}")
    dev = next(target.parameters()).device
    n_tok, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="make-data", disable=not progress)
    with JsonlWriter(out_dir / SAMPLES) as w:
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            # the batched loop drops finished rows (HF generate kept decoding them); a sampled response is seeded
            # per prompt (seed, id), so it does not depend on the batch it landed in or on a resume
            gens = [torch.Generator(device=dev).manual_seed(_row_seed(seed, row["id"])) for row, _ in batch]
            outs = batch_generate(
                target,
                [ids for _, ids in batch],
                max_new_tokens,
                stop_token_ids=stop,
                temperature=temperature,
                generators=gens,
            )
            for (row, ids), r in zip(batch, outs):
                resp = r.tokens  # a final stop token kept
                n_tok += len(resp)
                w.write(
                    {
                        "id": row["id"],
                        "source": row.get("source"),
                        "input_ids": ids.tolist() + resp,
                        "prompt_len": ids.numel(),
                    }
                )
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()
    return _write_meta(
        out_dir,
        {
            "responses": "target-generated",
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "new_this_run": len(todo),
            "tokens_per_s_this_run": n_tok / max(time.perf_counter() - t0, 1e-9),
        },
    )
