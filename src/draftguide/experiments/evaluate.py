"""Context-learning evaluation: task rows in, scored responses and a summary out.

- Tasks are CL-bench rows (see `tasks.py`); `load_tasks` checks each and names the line of a bad one.
- Methods: `METHODS[name](target, tokenizer, input_ids, max_new_tokens, stop_token_ids, **opts) -> new
  token ids`. `greedy` is the baseline; later methods register themselves with `@register_method`.
- Scoring: `rules` (every check passes) or `llm` (`judge.LLMJudge`, all rubrics met); `auto` uses the
  rules for rows with `checks` and the judge for the others.
- Runs are resumable: a row per task is appended and flushed to `results.jsonl` (`results.rank{r}.jsonl`
  under torchrun, one disjoint shard per rank); a rerun skips finished tasks and retries failed ones;
  at the end everything is merged, in task order, into `results.jsonl` and `summary.json`.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from draftguide.errors import DraftGuideError

RESULTS, SUMMARY, RUN = "results.jsonl", "summary.json", "run.json"
CHECK_TYPES = ("contains", "not_contains", "regex")
JUDGES = ("auto", "rules", "llm")
UNKNOWN = "(none)"

# -- methods --------------------------------------------------------------------------------------
METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator: `fn(target, tokenizer, input_ids [1, T], max_new_tokens, stop_token_ids, **opts) -> list[int]`
    (the new tokens only), or `(list[int], dict)` whose dict is added to the task's result row."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


@register_method("greedy")
def greedy(target, tokenizer, input_ids, max_new_tokens: int, stop_token_ids: list[int], **opts) -> list[int]:
    from draftguide.decode.speculative import greedy_generate

    if opts:
        raise DraftGuideError(f"method 'greedy' takes no options, got {sorted(opts)}")
    tokens, _ = greedy_generate(target, input_ids, max_new_tokens, stop_token_ids)
    return tokens[0, input_ids.shape[1] :].tolist()


# Methods that read a draft take its folder (or `init[:N]`) as the JSON-able option `draft`; it is
# loaded once per target and kept here.
_DRAFTS: dict[tuple[int, str], object] = {}


def method_draft(target, tokenizer, spec: str):
    from draftguide.modeling.draft_io import resolve_draft

    key = (id(target), spec)
    if key not in _DRAFTS:
        p = next(target.parameters())
        _DRAFTS[key] = resolve_draft(spec, target, tokenizer).to(device=p.device, dtype=p.dtype)
    return _DRAFTS[key]


def token_word(tokenizer, prefix: list[int], token: int, after: list[int] = ()) -> str | None:
    """The word (a run of word characters, as the diagnostic's whole-word tags) that `token` lies in, decoded
    after `prefix` and before `after`; None when the token holds no word character. With `after` empty, a word
    the token starts is cut at the token's end (what is known of it)."""
    head = tokenizer.decode(list(prefix))
    text = tokenizer.decode(list(prefix) + [int(token)] + list(after))
    end = len(tokenizer.decode(list(prefix) + [int(token)]))
    start = len(head) if text.startswith(head) else end  # a merge across the boundary: the token's end only
    return next(
        (m.group() for m in re.finditer(r"\w+", text) if m.start() < max(end, start + 1) and m.end() > start), None
    )


def flip_rows(flips, input_ids, tokenizer, new_tokens: list[int] | None = None) -> list[dict]:
    """Where guidance flipped the target's argmax, with whether either token occurs in the prompt (by id,
    and by text as the diagnostic counts it). With the output's `new_tokens`: also the word each token lies in
    (`guided_word`: in the output; `target_word`: the word the target's token starts or continues, cut at its
    end, since the target's own continuation was not decoded), for the matrix's whole-word context tags."""
    from draftguide.experiments.diagnostic import in_context

    ids, context = set(input_ids[0].tolist()), tokenizer.decode(input_ids[0])
    rows = []
    for f in flips:
        t_text, g_text = tokenizer.decode([f.target_token]), tokenizer.decode([f.guided_token])
        row = {
            "i": f.index,
            "target": f.target_token,
            "guided": f.guided_token,
            "target_text": t_text,
            "guided_text": g_text,
            "guided_id_in_context": f.guided_token in ids,
            "target_id_in_context": f.target_token in ids,
            "guided_in_context": in_context(g_text, context),
            "target_in_context": in_context(t_text, context),
        }
        if new_tokens is not None and f.index < len(new_tokens):
            before = new_tokens[: f.index]
            row["guided_word"] = token_word(tokenizer, before, new_tokens[f.index], new_tokens[f.index + 1 :])
            row["target_word"] = token_word(tokenizer, before, f.target_token)
        rows.append(row)
    return rows


@register_method("guided")
def guided(
    target,
    tokenizer,
    input_ids,
    max_new_tokens: int,
    stop_token_ids: list[int],
    *,
    beta: float,
    draft: str,
    beta_schedule: str = "fixed",
    mix: str = "logits",
    guard_top_k: int | None = None,
    speculative: bool = False,
    control: str | None = None,
    seed: int = 0,
    ttt: dict | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    donor_ids=None,
):
    """Draft-guided decoding (greedy unless `temperature` > 0); the row also gets the flips (guided argmax
    vs target argmax) and the mean effective beta. `ttt`
    (`ttt_adapt` keyword arguments) adapts the draft on this task's prompt first, and resets it after."""
    import torch

    from draftguide.decode.guided import guided_generate

    d = method_draft(target, tokenizer, draft)
    extra, donor_logits = {}, None
    if control == "shuffle":
        if donor_ids is None:
            raise DraftGuideError("the shuffled-readout null needs another task's prompt (run it through run_eval)")
        donor_logits = readout_trajectory_of(target, d, donor_ids, max_new_tokens, stop_token_ids)
    if ttt:
        from draftguide.training.ttt import ttt_adapt

        d = ttt_adapt(d, target, input_ids, **ttt)
        extra["ttt"] = {k: getattr(d.report, k) for k in ("loss_before", "loss_after", "seconds")}
    try:
        tokens, st = guided_generate(
            target,
            d,
            input_ids,
            beta=beta,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            beta_schedule=beta_schedule,
            mix=mix,
            guard_top_k=guard_top_k,
            control=control,
            speculative=speculative,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            donor_logits=donor_logits,
            generator=torch.Generator(device=input_ids.device).manual_seed(seed),
        )
    finally:
        if ttt:
            d.reset()  # the next task starts from the base draft
    new = tokens[0, input_ids.shape[1] :].tolist()
    extra |= {"flips": flip_rows(st.flips, input_ids, tokenizer, new), "mean_beta": st.mean_beta}
    return new, extra


# the donor's greedy continuation per (target, donor prompt, length): small, and reused across a sweep's betas
_DONOR_TOKENS: dict[tuple, list[int]] = {}


def readout_trajectory_of(target, draft, donor_ids, max_new_tokens: int, stop_token_ids: list[int]):
    """The readout's k=1 logits [A, V] along the target's greedy answer to the donor prompt (see
    `guided.readout_trajectory`)."""
    from draftguide.decode.guided import readout_trajectory
    from draftguide.decode.speculative import greedy_generate

    key = (id(target), tuple(donor_ids[0].tolist()), max_new_tokens, tuple(stop_token_ids))
    if key not in _DONOR_TOKENS:
        out, _ = greedy_generate(target, donor_ids, max_new_tokens, stop_token_ids)
        _DONOR_TOKENS[key] = out[0, donor_ids.shape[1] :].tolist()
    return readout_trajectory(target, draft, donor_ids, _DONOR_TOKENS[key])


@register_method("guided-noise")
def guided_noise(target, tokenizer, input_ids, max_new_tokens: int, stop_token_ids: list[int], **opts):
    """The null control of `guided`: the draft logits replaced by noise with their per-token mean and std."""
    return guided(target, tokenizer, input_ids, max_new_tokens, stop_token_ids, control="noise", **opts)


@register_method("guided-shuffle")
def guided_shuffle(
    target, tokenizer, input_ids, max_new_tokens: int, stop_token_ids: list[int], *, donor_ids=None, **opts
):
    """The shuffled-readout null of `guided`: guidance from another task's readout. New token i is mixed with
    the readout's k=1 logits at step i of the target's greedy answer to the *donor* task (in `run_eval`: the
    next task of the run's list, cyclically), a real readout distribution that knows nothing of this task.
    Without TTT (the donor's readout is the base draft's)."""
    if opts.get("ttt"):
        raise DraftGuideError("method 'guided-shuffle' takes no ttt (the donor's readout is the base draft's)")
    return guided(
        target, tokenizer, input_ids, max_new_tokens, stop_token_ids, control="shuffle", donor_ids=donor_ids, **opts
    )


DONOR_METHODS = ("guided-shuffle",)  # run_eval hands these another task's prompt (`donor_ids`)


@register_method("sample")
def sample(
    target,
    tokenizer,
    input_ids,
    max_new_tokens: int,
    stop_token_ids: list[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[int]:
    import torch

    from draftguide.decode.baselines import sample_generate

    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    tokens, _ = sample_generate(
        target,
        input_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        generator=gen,
    )
    return tokens[0, input_ids.shape[1] :].tolist()


@register_method("power")
def power(
    target,
    tokenizer,
    input_ids,
    max_new_tokens: int,
    stop_token_ids: list[int],
    *,
    preset: str = "paper",
    alpha: float | None = None,
    mcmc_steps: int | None = None,
    block_num: int | None = None,
    seed: int = 0,
):
    """Power Sampling with a preset's settings (`POWER_PRESETS`: "paper", the reference's; "cpu", cheaper),
    any of alpha / mcmc_steps / block_num overriding it. The row records the settings used and the cost."""
    import torch

    from draftguide.decode.baselines import POWER_PRESETS, power_sample

    if preset not in POWER_PRESETS:
        raise DraftGuideError(f"unknown Power Sampling preset {preset!r} (expected one of {', '.join(POWER_PRESETS)})")
    given = {k: v for k, v in dict(alpha=alpha, mcmc_steps=mcmc_steps, block_num=block_num).items() if v is not None}
    settings = POWER_PRESETS[preset] | given
    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    tokens, st = power_sample(
        target, input_ids, **settings, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, generator=gen
    )
    extra = {
        "tokens_per_output_token": st.tokens_per_output_token,
        "mh_acceptance": st.acceptance_rate,
        "power": {"preset": preset, **settings},
    }
    return tokens[0, input_ids.shape[1] :].tolist(), extra


@register_method("dola")
def dola(
    target,
    tokenizer,
    input_ids,
    max_new_tokens: int,
    stop_token_ids: list[int],
    *,
    candidate_layers: list[int] | None = None,
    relative_top: float = 0.1,
):
    from draftguide.decode.baselines import dola_generate

    tokens, st = dola_generate(
        target,
        input_ids,
        candidate_layers=candidate_layers,
        relative_top=relative_top,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
    )
    return tokens[0, input_ids.shape[1] :].tolist(), {"premature_layers": st.premature_layers}


# Batched variants: `fn(target, tokenizer, [input_ids [1, T_i]], max_new_tokens, stop_token_ids, *, max_batch,
# on_done, **opts)` calls `on_done(i, (new tokens or (new tokens, extra fields), seconds from the row's prefill to
# its end))` for each prompt as soon as it is done; each row equals the method's batch-1 output
# (`batched.batch_generate`, at most `max_batch` rows at a time, a waiting prompt taking a finished row's slot).
# Methods without one (power, dola, guided with ttt or speculative=True) run row by row under --batch-size.
BATCH_METHODS: dict[str, Callable] = {}


def _batch_greedy(target, tokenizer, ids_list, max_new_tokens, stop_token_ids, *, max_batch=None, on_done=None, **opts):
    from draftguide.decode.batched import batch_generate

    if opts:
        raise DraftGuideError(f"method 'greedy' takes no options, got {sorted(opts)}")
    batch_generate(
        target,
        ids_list,
        max_new_tokens,
        stop_token_ids=stop_token_ids,
        max_batch=max_batch,
        on_done=lambda i, r: on_done(i, (r.tokens, r.stats.total_s)),
    )


def _batch_sample(
    target,
    tokenizer,
    ids_list,
    max_new_tokens,
    stop_token_ids,
    *,
    max_batch=None,
    on_done=None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
):
    import torch

    from draftguide.decode.batched import batch_generate

    gens = [torch.Generator(device=x.device).manual_seed(seed) for x in ids_list]  # as batch 1: the seed per task
    batch_generate(
        target,
        ids_list,
        max_new_tokens,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        generators=gens,
        max_batch=max_batch,
        on_done=lambda i, r: on_done(i, (r.tokens, r.stats.total_s)),
    )


def _batch_guided(
    target,
    tokenizer,
    ids_list,
    max_new_tokens,
    stop_token_ids,
    *,
    max_batch=None,
    on_done=None,
    beta: float,
    draft: str,
    beta_schedule: str = "fixed",
    mix: str = "logits",
    guard_top_k: int | None = None,
    speculative: bool = False,
    control: str | None = None,
    seed: int = 0,
    ttt: dict | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
):
    import torch

    from draftguide.decode.batched import batch_generate

    if ttt or speculative:  # a draft adapted per task, or the block-verified loop: batch 1, row by row
        opts = dict(
            beta=beta,
            draft=draft,
            beta_schedule=beta_schedule,
            mix=mix,
            guard_top_k=guard_top_k,
            speculative=speculative,
            control=control,
            seed=seed,
            ttt=ttt,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
        return _row_by_row(guided, target, tokenizer, ids_list, max_new_tokens, stop_token_ids, on_done=on_done, **opts)
    d = method_draft(target, tokenizer, draft)
    gens = [torch.Generator(device=x.device).manual_seed(seed) for x in ids_list]

    def done(i, r):
        extra = {"flips": flip_rows(r.stats.flips, ids_list[i], tokenizer, r.tokens), "mean_beta": r.stats.mean_beta}
        on_done(i, ((r.tokens, extra), r.stats.total_s))

    batch_generate(
        target,
        ids_list,
        max_new_tokens,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        generators=gens,
        draft=d,
        beta=beta,
        mix=mix,
        beta_schedule=beta_schedule,
        guard_top_k=guard_top_k,
        control=control,
        max_batch=max_batch,
        on_done=done,
    )


def _batch_guided_noise(target, tokenizer, ids_list, max_new_tokens, stop_token_ids, **opts):
    return _batch_guided(target, tokenizer, ids_list, max_new_tokens, stop_token_ids, control="noise", **opts)


def _row_by_row(
    fn, target, tokenizer, ids_list, max_new_tokens, stop_token_ids, *, max_batch=None, on_done=None, **opts
):
    for i, x in enumerate(ids_list):
        t0 = time.perf_counter()
        new = fn(target, tokenizer, x, max_new_tokens, stop_token_ids, **opts)
        on_done(i, (new, time.perf_counter() - t0))


BATCH_METHODS.update(
    {"greedy": _batch_greedy, "sample": _batch_sample, "guided": _batch_guided, "guided-noise": _batch_guided_noise}
)


def batch_method(method: str) -> Callable:
    """The batched form of `method`: its own, or its batch-1 function run row by row."""
    if method in BATCH_METHODS:
        return BATCH_METHODS[method]
    return lambda target, tokenizer, ids_list, n, stop, **kw: _row_by_row(
        METHODS[method], target, tokenizer, ids_list, n, stop, **kw
    )


def check_method_options(method: str, opts: dict) -> None:
    """Unknown or missing options of a method, as one clear error before any model is loaded."""
    import inspect

    fn = guided if METHODS[method] in (guided_noise, guided_shuffle) else METHODS[method]  # they pass all on to guided
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and fn is not greedy:
        return  # a method taking **opts checks them itself
    named = {k: p for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in ("control", "donor_ids")}
    unknown = sorted(set(opts) - set(named))
    if unknown:
        raise DraftGuideError(
            f"method {method!r} takes no option(s) {unknown} (its options: {sorted(named) or 'none'})"
        )
    missing = sorted(k for k, p in named.items() if p.default is p.empty and k not in opts)
    if missing:
        raise DraftGuideError(f"method {method!r} needs option(s) {missing}")


# -- scoring --------------------------------------------------------------------------------------
def strip_thinking(text: str) -> str:
    """Drop `<think>...</think>` blocks; an unclosed one (cut by the token limit) drops the rest; a lone
    `</think>` (the template opened it in the prompt) keeps what follows it."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0].strip()


def score_checks(response: str, checks: list[dict]) -> tuple[bool, list[dict]]:
    """All checks, case-insensitive: `contains` / `not_contains` a substring, `regex` searched anywhere.
    Returns (every check passed, [{type, value, passed}])."""
    low, details = response.lower(), []
    for c in checks:
        kind, value = c["type"], str(c["value"])
        if kind == "contains":
            ok = value.lower() in low
        elif kind == "not_contains":
            ok = value.lower() not in low
        elif kind == "regex":
            ok = re.search(value, response, flags=re.I) is not None
        else:
            raise DraftGuideError(f"unknown check type {kind!r} (expected one of {', '.join(CHECK_TYPES)})")
        details.append({"type": kind, "value": value, "passed": ok})
    return bool(details) and all(d["passed"] for d in details), details


# -- task rows ------------------------------------------------------------------------------------
def _problem(row: dict) -> str | None:
    """What is wrong with a task row, or None."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return "every message needs a string 'role' and 'content'"
    if msgs[-1]["role"] != "user":
        return "the last message must be the user's task"
    meta = row.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("task_id"), str) or not meta["task_id"]:
        return "'metadata' must hold a non-empty string 'task_id'"
    rubrics = row.get("rubrics", [])
    if not isinstance(rubrics, list) or not all(isinstance(r, str) for r in rubrics):
        return "'rubrics' must be a list of strings"
    checks = row.get("checks", [])
    if not isinstance(checks, list):
        return "'checks' must be a list"
    for c in checks:
        if (
            not isinstance(c, dict)
            or c.get("type") not in CHECK_TYPES
            or not isinstance(c.get("value"), (str, int, float))
        ):
            return f"bad check {c!r}: needs 'type' ({'/'.join(CHECK_TYPES)}) and a 'value'"
        if c["type"] == "regex":
            try:
                re.compile(str(c["value"]))
            except re.error as e:
                return f"check regex {c['value']!r} does not compile ({e})"
    if not rubrics and not checks:
        return "a task needs 'rubrics' or 'checks' to be scored"
    return None


def load_tasks(source: str, skip_bad: bool = False) -> tuple[list[dict], list[dict]]:
    """Task rows of a JSONL file, or the built-in suite (`builtin`). A malformed row raises an error
    naming its line; with `skip_bad` it is returned in the second list ({line, error}) instead."""
    from draftguide.experiments.tasks import builtin_tasks_path
    from draftguide.modeling.prompts import read_jsonl

    path = builtin_tasks_path() if source == "builtin" else Path(source)
    raw_bad: list = []
    rows = read_jsonl(path, bad=raw_bad if skip_bad else None)
    bad = [{"line": n, "error": msg} for n, msg in raw_bad]
    tasks, seen = [], {}
    for row in rows:
        n = row["_line"]
        problem = _problem(row)
        if problem is None and row["metadata"]["task_id"] in seen:
            problem = (
                f"duplicate task_id {row['metadata']['task_id']!r} (first on line {seen[row['metadata']['task_id']]})"
            )
        if problem is None:
            seen[row["metadata"]["task_id"]] = n
            tasks.append(row)
        elif skip_bad:
            bad.append({"line": n, "error": f"{path}:{n}: {problem}"})
        else:
            raise DraftGuideError(f"{path}:{n}: {problem} (--skip-bad skips such rows)")
    if not tasks:
        raise DraftGuideError(f"no usable tasks in '{path}'")
    return tasks, sorted(bad, key=lambda b: b["line"])


def check_method(method: str, max_new_tokens: int) -> None:
    if method not in METHODS:
        raise DraftGuideError(f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    if max_new_tokens < 1:
        raise DraftGuideError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_prompt_lengths(
    target, tokenizer, tasks: list[dict], max_new_tokens: int, chat_template_kwargs: dict | None = None
) -> None:
    """Every task's prompt plus `max_new_tokens` fits the target's positions, or one error naming the first
    task that does not (its line and task id)."""
    from draftguide.modeling.prompts import check_length, encode_prompt, place

    for t in tasks:
        check_length(
            target,
            encode_prompt(tokenizer, t, chat_template_kwargs=chat_template_kwargs).shape[1],
            max_new_tokens,
            place(t),
        )


def check_judge(tasks: list[dict], judge: str) -> bool:
    """Whether the run needs the LLM judge; raises if `rules` is asked for tasks without checks."""
    if judge not in JUDGES:
        raise DraftGuideError(f"unknown judge {judge!r} (expected one of {', '.join(JUDGES)})")
    if judge == "rules":
        bare = next((t for t in tasks if not t.get("checks")), None)
        if bare is not None:
            raise DraftGuideError(
                f"line {bare['_line']}: task {bare['metadata']['task_id']!r} has no 'checks'; use --judge llm"
            )
        return False
    return judge == "llm" or any(not t.get("checks") for t in tasks)


# -- one task -------------------------------------------------------------------------------------
def _categories(task: dict) -> dict:
    m = task["metadata"]
    return {
        "task_id": m["task_id"],
        "context_id": m.get("context_id"),
        "context_category": m.get("context_category") or UNKNOWN,
        "sub_category": m.get("sub_category") or UNKNOWN,
    }


def _error_class(rec: dict, task: dict) -> str:
    """The failure class of a finished failed row (`taxonomy.classify_response`)."""
    from draftguide.experiments.taxonomy import classify_response

    return classify_response(rec.get("response", ""), task, rec)


def evaluate_task(
    target,
    tokenizer,
    task: dict,
    method: str,
    max_new_tokens: int,
    stop: list[int],
    judge: str,
    llm_judge=None,
    method_options: dict | None = None,
    chat_template_kwargs: dict | None = None,
    donor: dict | None = None,
) -> dict:
    """Generate and score one task; raises on failure (the run loop records it). `donor`: another task, whose
    prompt a `DONOR_METHODS` method reads."""
    from draftguide.modeling.prompts import check_length, encode_prompt, place

    ids = encode_prompt(tokenizer, task, chat_template_kwargs=chat_template_kwargs).to(next(target.parameters()).device)
    check_length(target, ids.shape[1], max_new_tokens, place(task))
    opts = dict(method_options or {})
    if method in DONOR_METHODS:
        if donor is None:
            raise DraftGuideError(f"method {method!r} needs a donor task")
        opts["donor_ids"] = encode_prompt(tokenizer, donor, chat_template_kwargs=chat_template_kwargs).to(ids.device)
    t0 = time.perf_counter()
    new = METHODS[method](target, tokenizer, ids, max_new_tokens, stop, **opts)
    donor_id = donor["metadata"]["task_id"] if donor is not None and method in DONOR_METHODS else None
    return score_task(tokenizer, task, method, ids.shape[1], new, time.perf_counter() - t0, judge, llm_judge, donor_id)


def score_task(
    tokenizer,
    task: dict,
    method: str,
    prompt_tokens: int,
    new,
    gen_s: float,
    judge: str,
    llm_judge=None,
    donor_task_id: str | None = None,
) -> dict:
    """The result row of one task from its generated tokens (`new`: token ids, or `(ids, extra fields)`)."""
    from draftguide.experiments.judge import JudgeUnavailable
    from draftguide.modeling.text import decode_text

    new, extra = new if isinstance(new, tuple) else (new, {})  # a method may add fields to the row
    raw = decode_text(tokenizer, new)
    response = strip_thinking(raw)
    rec = _categories(task) | {
        "method": method,
        "status": "ok",
        "response": response,
        "reference_answer": task.get("reference_answer"),
    }
    if donor_task_id is not None:
        rec["donor_task_id"] = donor_task_id
    if raw.strip() != response:
        rec["raw_response"] = raw
    use = "rules" if judge == "rules" or (judge == "auto" and task.get("checks")) else "llm"
    t1 = time.perf_counter()
    if use == "rules":
        passed, details = score_checks(response, task["checks"])
        rec |= {"judge": "rules", "score": int(passed), "checks": details}
    else:
        try:
            v = llm_judge(task.get("rubrics", []), response)
        except JudgeUnavailable as e:  # no verdict: a failed task (retried by a rerun), never a 0
            return (
                rec
                | {
                    "judge": "llm",
                    "status": "error",
                    "score": None,
                    "error": str(e),
                    "prompt_tokens": prompt_tokens,
                    "new_tokens": len(new),
                    "gen_s": gen_s,
                }
                | extra
            )
        rec |= {
            "judge": "llm",
            "score": v["score"],
            "rubrics": task.get("rubrics", []),
            "rubric_results": v["rubric_results"],
            "judge_rationale": v["rationale"],
            "judge_tries": v["tries"],
            "judge_error": v["error"],
        }
    rec |= {
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(new),
        "gen_s": gen_s,
        "judge_s": time.perf_counter() - t1,
        "error": None,
    } | extra
    rec["error_class"] = _error_class(rec, task) if not rec["score"] else None
    return rec


def evaluate_batch(
    target,
    tokenizer,
    tasks: list[dict],
    method: str,
    max_new_tokens: int,
    stop: list[int],
    judge: str,
    llm_judge=None,
    method_options: dict | None = None,
    chat_template_kwargs: dict | None = None,
    *,
    batch_size: int,
    write: Callable[[dict], None],
) -> None:
    """Generate `tasks` with `batch_method(method)`, at most `batch_size` at a time (a waiting task takes a
    finished one's slot), and `write` each task's scored row as soon as it is done; raises on a generation
    failure (rows already written stay). A row's `gen_s` is the time from its own prefill to its end."""
    from draftguide.modeling.prompts import check_length, encode_prompt, place

    dev = next(target.parameters()).device
    ids = [encode_prompt(tokenizer, t, chat_template_kwargs=chat_template_kwargs).to(dev) for t in tasks]
    for t, x in zip(tasks, ids):
        check_length(target, x.shape[1], max_new_tokens, place(t))

    def score(i: int, new, gen_s: float) -> None:
        rec = score_task(tokenizer, tasks[i], method, ids[i].shape[1], new, gen_s, judge, llm_judge)
        write(rec | {"batch_size": batch_size})

    if llm_judge is None:  # rules: scored at once
        batch_method(method)(
            target,
            tokenizer,
            ids,
            max_new_tokens,
            stop,
            max_batch=batch_size,
            on_done=lambda i, res: score(i, *res),
            **(method_options or {}),
        )
        return
    # an LLM judge answers over the network: its calls run in a thread, so the batch keeps decoding meanwhile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def judged(i: int, new, gen_s: float) -> None:
        rec = score_task(tokenizer, tasks[i], method, ids[i].shape[1], new, gen_s, judge, llm_judge)
        with lock:
            write(rec | {"batch_size": batch_size})

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftguide-judge") as pool:
        futures = []
        batch_method(method)(
            target,
            tokenizer,
            ids,
            max_new_tokens,
            stop,
            max_batch=batch_size,
            on_done=lambda i, res: futures.append(pool.submit(judged, i, *res)),
            **(method_options or {}),
        )
        for f in futures:
            f.result()


# -- the run --------------------------------------------------------------------------------------
def _dist_init() -> tuple[int, int, bool]:
    """(rank, world, whether we created the process group). torchrun sets WORLD_SIZE/RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    from datetime import timedelta

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:  # gloo: only barriers cross processes, so this works next to CUDA ranks too
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), created


def _result_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("results.rank*.jsonl")) + ([out_dir / RESULTS] if (out_dir / RESULTS).is_file() else [])


def _latest_rows(out_dir: Path) -> dict[str, dict]:
    """task_id -> its row: a finished row over a failed one, else the later one."""
    from draftguide.modeling.prompts import read_jsonl

    latest: dict[str, dict] = {}
    for path in _result_files(out_dir):
        for r in read_jsonl(path, bad=[]):  # a line cut by a crash is simply redone
            r.pop("_line", None)
            tid = r.get("task_id")
            if tid is None or r.get("status") == "bad_row":
                continue
            if r.get("status") == "ok" or latest.get(tid, {}).get("status") != "ok":
                latest[tid] = r
    return latest


def _check_settings(out_dir: Path, settings: dict, rank: int) -> None:
    """A rerun into the same folder must use the same settings, or resumed rows would mix two runs."""
    import json

    from draftguide.reporting.runs import write_json

    path = out_dir / RUN
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8-sig"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise DraftGuideError(f"'{out_dir}' holds a run with other settings ({', '.join(diff)}); use another --out")
    elif rank == 0:
        write_json(path, settings)


def run_eval(
    target,
    tokenizer,
    tasks: list[dict],
    out_dir,
    *,
    method: str = "greedy",
    max_new_tokens: int = 256,
    judge: str = "auto",
    llm_judge=None,
    method_options: dict | None = None,
    bad_rows: list[dict] = (),
    settings: dict | None = None,
    progress: bool = True,
    batch_size: int = 1,
    chat_template_kwargs: dict | None = None,
) -> dict:
    """Evaluate `tasks` (resuming in `out_dir`), merge and summarise. Under torchrun each rank takes
    tasks[rank::world]; every rank returns the same summary. `batch_size` > 1 decodes that many tasks together
    (`batched.batch_generate`, prompts of similar length together; each answer equals its batch-1 answer up to
    float rounding), so it is not part of the run's settings: a run may resume with another batch size. Power
    Sampling and DoLa (and guided decoding with ttt or speculative) run row by row. `chat_template_kwargs`:
    extra variables for the chat template (e.g. {"enable_thinking": false} for Qwen3)."""
    from tqdm.auto import tqdm

    from draftguide.modeling.prompts import stop_token_ids
    from draftguide.reporting.runs import JsonlWriter

    check_method(method, max_new_tokens)
    check_method_options(method, method_options or {})
    if check_judge(tasks, judge) and llm_judge is None:
        raise DraftGuideError("some tasks need the LLM judge (no 'checks'), but none is configured")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DraftGuideError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_prompt_lengths(
        target, tokenizer, tasks, max_new_tokens, chat_template_kwargs
    )  # every task fits, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "method": method,
        "method_options": method_options or {},
        "max_new_tokens": max_new_tokens,
        "judge": judge,
        **(llm_judge.settings() if llm_judge is not None else {}),
        **(settings or {}),
    }
    if chat_template_kwargs:
        settings["chat_template_kwargs"] = chat_template_kwargs
    rank, world, created = _dist_init()
    try:
        _check_settings(out_dir, settings, rank)
        done = {tid for tid, r in _latest_rows(out_dir).items() if r.get("status") == "ok"}
        todo = [t for t in tasks[rank::world] if t["metadata"]["task_id"] not in done]
        stop = stop_token_ids(tokenizer, target)
        # a donor method reads the next task of the whole list (cyclically): fixed by the list, not the shard
        donors = (
            {t["metadata"]["task_id"]: tasks[(i + 1) % len(tasks)] for i, t in enumerate(tasks)}
            if method in DONOR_METHODS
            else {}
        )
        name = RESULTS if world == 1 else f"results.rank{rank}.jsonl"
        ctk = chat_template_kwargs
        with JsonlWriter(out_dir / name) as w:
            bar = tqdm(
                total=len(todo), desc=f"eval[{rank}]" if world > 1 else "eval", disable=not progress or rank != 0
            )
            if batch_size == 1 or method in DONOR_METHODS:  # a donor method reads another task's prompt: batch 1
                for task in todo:
                    try:
                        rec = evaluate_task(
                            target,
                            tokenizer,
                            task,
                            method,
                            max_new_tokens,
                            stop,
                            judge,
                            llm_judge,
                            method_options,
                            ctk,
                            donors.get(task["metadata"]["task_id"]),
                        )
                    except Exception as e:  # recorded and retried by the next run; the run goes on
                        rec = _error_row(task, method, e)
                    w.write(rec | ({"rank": rank} if world > 1 else {}))
                    bar.update(1)
            else:
                from draftguide.modeling.prompts import encode_prompt

                # similar prompt lengths decode side by side (less padding); rows are written as they finish
                length = {
                    t["metadata"]["task_id"]: encode_prompt(tokenizer, t, chat_template_kwargs=ctk).shape[1]
                    for t in todo
                }
                todo = sorted(todo, key=lambda t: length[t["metadata"]["task_id"]])
                written: set[str] = set()

                def write(rec: dict) -> None:
                    w.write(rec | ({"rank": rank} if world > 1 else {}))
                    written.add(rec["task_id"])
                    bar.update(1)

                try:
                    evaluate_batch(
                        target,
                        tokenizer,
                        todo,
                        method,
                        max_new_tokens,
                        stop,
                        judge,
                        llm_judge,
                        method_options,
                        ctk,
                        batch_size=batch_size,
                        write=write,
                    )
                except Exception as e:  # the tasks not yet done are recorded as failed and retried by the next run
                    for t in todo:
                        if t["metadata"]["task_id"] not in written:
                            write(_error_row(t, method, e))
            bar.close()
        if world > 1:
            _barrier()
        try:
            if rank == 0:
                finalize(out_dir, tasks, bad_rows, settings)
        finally:
            if world > 1:
                _barrier()  # the others wait for the merged outputs
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    import json

    return json.loads((out_dir / SUMMARY).read_text())


def _error_row(task: dict, method: str, e: Exception) -> dict:
    return _categories(task) | {
        "method": method,
        "status": "error",
        "score": None,
        "error": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(limit=3),
    }


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def finalize(out_dir: str | Path, tasks: list[dict], bad_rows: list[dict] = (), settings: dict | None = None) -> dict:
    """Merge every results file of `out_dir` into `results.jsonl` (task order, one row per task, then rows
    of tasks outside this task list, then bad input rows) and write `summary.json`."""
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    latest = _latest_rows(out_dir)
    order = [t["metadata"]["task_id"] for t in tasks]
    rows = [latest.pop(tid) for tid in order if tid in latest]
    extra = list(latest.values())
    tmp = out_dir / (RESULTS + ".tmp")
    with JsonlWriter(tmp, mode="w") as w:
        for r in rows + extra + [{"task_id": None, "status": "bad_row"} | b for b in bad_rows]:
            w.write(r)
    os.replace(tmp, out_dir / RESULTS)
    for p in out_dir.glob("results.rank*.jsonl"):
        p.unlink()
    summary = summarize_eval(rows, n_tasks=len(tasks)) | {
        "n_bad_rows": len(bad_rows),
        "bad_rows": list(bad_rows),
        "settings": settings or {},
        "environment": environment(),
    }
    write_json(out_dir / SUMMARY, summary)
    return summary


def solve_rate_stats(scores: list[int]) -> dict:
    """Solve rate of 0/1 task scores with its 95% bootstrap CI over tasks: {"n", "solve_rate", "ci95"}."""
    from draftguide.reporting.runs import bootstrap_ci

    return {
        "n": len(scores),
        "solve_rate": sum(scores) / len(scores) if scores else float("nan"),
        "ci95": list(bootstrap_ci(scores)),
    }


def summarize_eval(rows: list[dict], n_tasks: int | None = None) -> dict:
    """Solve rate over finished tasks (an unparseable judge reply counts as 0), per category and subcategory
    with 95% bootstrap CIs; failed tasks (errors, a judge that could not be reached included) are counted apart
    and left out of the rates."""
    ok = [r for r in rows if r.get("status") == "ok"]
    cats: dict[str, dict[str, list[int]]] = {}
    for r in ok:
        cats.setdefault(r["context_category"], {}).setdefault(r["sub_category"], []).append(int(r["score"]))
    by_cat = {
        c: solve_rate_stats([s for v in subs.values() for s in v])
        | {"subcategories": {k: solve_rate_stats(v) for k, v in sorted(subs.items())}}
        for c, subs in sorted(cats.items())
    }
    errors = [r for r in rows if r.get("status") == "error"]
    from draftguide.experiments.taxonomy import class_counts

    return solve_rate_stats([int(r["score"]) for r in ok]) | {
        "error_classes": class_counts(ok),
        "n_tasks": n_tasks if n_tasks is not None else len(rows),
        "n_errors": len(errors),
        "n_pending": (n_tasks - len(rows)) if n_tasks is not None else 0,
        "n_judge_failures": sum(1 for r in ok if r.get("judge_error")),
        "categories": by_cat,
        "errors": [{"task_id": r["task_id"], "error": r["error"]} for r in errors][:50],
    }


def format_table(summary: dict) -> str:
    from draftguide.reporting.runs import fmt

    def line(name, g, indent=""):
        lo, hi = g["ci95"]
        return f"{indent + name:<44} {g['n']:>5} {fmt(g['solve_rate'], '.3f'):>7}  [{fmt(lo)}, {fmt(hi)}]"

    out = [f"{'category / subcategory':<44} {'n':>5} {'solved':>7}  95% CI"]
    for c, g in summary["categories"].items():
        out.append(line(c, g))
        out += [line(s, sg, "  ") for s, sg in g["subcategories"].items()]
    out.append(line("overall", summary))
    extra = [
        f"{summary[k]} {k[2:].replace('_', ' ')}"
        for k in ("n_errors", "n_pending", "n_judge_failures", "n_bad_rows")
        if summary.get(k)
    ]
    if extra:
        out.append("(" + ", ".join(extra) + ")")
    if not summary["n"]:
        out.append("(solved -: no task finished, so there is no rate)")
    ec = summary.get("error_classes")
    if ec and ec["n_failed"]:
        out.append(f"failed ({ec['n_failed']}): " + ", ".join(f"{k} {n}" for k, n in ec["counts"].items()))
    return "\n".join(out)
