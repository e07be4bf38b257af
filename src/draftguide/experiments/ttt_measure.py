"""What test-time training buys: acceptance length before/after TTT (`ttt-tau`) and sweeps over steps, lr and
rank (`sweep ttt`). Arithmetic and run folders only; ``reporting` draws and writes sweep.md.

Contexts come from
- `suite`: the built-in task suite through the chat template (system + user turns); the continuation is the
  target's greedy answer;
- `suite-doc`: the suite's context documents as raw text, cut to their first part (`context_tokens`); the
  target continues the document;
- chat prompt sets (`builtin`, `mtbench`, `humaneval`, `sharegpt-heldout`) or JSONL files of prompts.

`ttt-tau` runs real speculative decoding (greedy, so the continuation is the target's own and identical
before and after) with the base draft and with the draft adapted on the context. The sweep measures tau by
teacher forcing (`replay_acceptance`: the acceptance lengths greedy speculative decoding would have on the
target's continuation, from one multi-anchor draft pass), so that every (steps, lr, rank) point costs one
draft pass instead of a decoding run; a test checks it against `speculative_generate`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from draftguide.errors import DraftGuideError
from draftguide.experiments.diagnostic import context_text, task_id
from draftguide.modeling.targets import extract_features
from draftguide.reporting.runs import bootstrap_ci

CHAT_SETS = ("builtin", "mtbench", "humaneval", "sharegpt-heldout")
SUITE_SETS = ("suite", "suite-doc")


@dataclass
class Context:
    id: str
    set: str
    ids: torch.Tensor  # [1, T]


# -- contexts -----------------------------------------------------------------------------------------
def load_contexts(spec: str, tokenizer, limit: int | None = None, context_tokens: int = 256) -> list[Context]:
    """Contexts of one set (see the module doc). `suite-doc` keeps the first `context_tokens` tokens of each
    document, and at most two thirds of it, so that the document goes on after the cut."""
    from draftguide.modeling.prompts import encode_prompt

    if spec in SUITE_SETS:
        from draftguide.experiments.tasks import load_builtin_tasks

        tasks = load_builtin_tasks()[:limit]
        if spec == "suite":
            return [Context(task_id(t), spec, encode_prompt(tokenizer, t)) for t in tasks]
        out = []
        for t in tasks:
            doc = tokenizer(context_text(t))["input_ids"]
            keep = min(context_tokens, 2 * len(doc) // 3)
            if keep >= 3:
                out.append(Context(task_id(t), spec, torch.tensor([doc[:keep]])))
        return out
    from draftguide.modeling.prompts import load_prompts
    from draftguide.training.datasources import load_source

    if spec not in CHAT_SETS and not spec.endswith(".jsonl"):
        raise DraftGuideError(
            f"unknown context set {spec!r}: expected {', '.join(SUITE_SETS + CHAT_SETS)} or a .jsonl file"
        )
    rows = load_prompts(spec)[:limit] if spec == "builtin" else load_source(spec, limit=limit)
    return [Context(str(r.get("id", i)), set_name(spec), encode_prompt(tokenizer, r)) for i, r in enumerate(rows)]


def set_name(spec: str) -> str:
    """A set's name in tables: the file stem for a JSONL file."""
    return Path(spec).stem if spec.endswith(".jsonl") else spec


def parse_sets(text: str) -> list[str]:
    sets = [s.strip() for s in text.split(",") if s.strip()]
    if not sets:
        raise DraftGuideError("--sets is empty")
    return sets


# -- ttt-tau -----------------------------------------------------------------------------------------
def tau_before_after(target, draft, ctx: Context, ttt, *, max_new_tokens: int, stop: list[int]) -> dict:
    """Greedy speculative decoding from `ctx` with the base draft, then with the draft adapted (TTT) on `ctx`."""
    from draftguide.decode.speculative import speculative_generate
    from draftguide.training.ttt import ttt_adapt

    ids = ctx.ids.to(next(target.parameters()).device)
    base_tokens, base = speculative_generate(target, draft, ids, max_new_tokens, stop_token_ids=stop)
    with ttt_adapt(draft, target, ids, **ttt.kwargs()) as adapted:
        tokens, st = speculative_generate(target, adapted, ids, max_new_tokens, stop_token_ids=stop)
        report = adapted.report
    return {
        "id": ctx.id,
        "set": ctx.set,
        "context_tokens": ids.shape[1],
        "new_tokens": st.num_new_tokens,
        "tau_base": base.tau,
        "tau_ttt": st.tau,
        "delta_tau": st.tau - base.tau,
        "acceptance_base": base.acceptance_lengths,
        "acceptance_ttt": st.acceptance_lengths,
        "identical_output": torch.equal(tokens, base_tokens),
        "decode_s_base": base.decode_s,
        "decode_s_ttt": st.decode_s,
        "ttt": {k: v for k, v in report.to_dict().items() if k not in ("train_losses", "target_modules")},
    }


def tau_summary(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """tau before/after pooled over verify steps, and the mean per-context delta-tau with a bootstrap CI."""
    steps_b = [a for r in rows for a in r["acceptance_base"]]
    steps_t = [a for r in rows for a in r["acceptance_ttt"]]
    deltas = [r["delta_tau"] for r in rows]
    return {
        "n_contexts": len(rows),
        "mean_context_tokens": float(np.mean([r["context_tokens"] for r in rows])),
        "tau_base": sum(steps_b) / max(len(steps_b), 1),
        "tau_ttt": sum(steps_t) / max(len(steps_t), 1),
        "delta_tau_mean": float(np.mean(deltas)),
        "delta_tau_ci95": list(bootstrap_ci(deltas, n_boot=n_boot, seed=seed)),
        "contexts_improved": sum(d > 0 for d in deltas),
        "contexts_worse": sum(d < 0 for d in deltas),
        "identical_output": all(r["identical_output"] for r in rows),
        "mean_context_loss_before": float(np.mean([r["ttt"]["loss_before"] for r in rows])),
        "mean_context_loss_after": float(np.mean([r["ttt"]["loss_after"] for r in rows])),
        "mean_ttt_s": float(np.mean([r["ttt"]["seconds"] for r in rows])),
        "mean_ttt_prefill_ratio": float(
            np.mean([r["ttt"]["prefill_ratio"] for r in rows if r["ttt"]["prefill_ratio"]])
        ),
    }


def run_ttt_tau(
    target,
    tokenizer,
    draft,
    sets: list[str],
    out_dir,
    ttt,
    *,
    limit: int | None = 8,
    max_new_tokens: int = 64,
    context_tokens: int = 256,
    command: str = "",
    progress: bool = True,
) -> dict:
    """`results.jsonl` (a row per context) and `summary.json` (per set and over all sets)."""
    from tqdm.auto import tqdm

    from draftguide.modeling.prompts import check_length, stop_token_ids
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    contexts = {set_name(s): load_contexts(s, tokenizer, limit, context_tokens) for s in sets}
    for ctx in (c for cs in contexts.values() for c in cs):  # every context fits, before any work
        check_length(target, ctx.ids.shape[1], max_new_tokens, f"{ctx.set} context {ctx.id!r}", "context")
    stop = stop_token_ids(tokenizer, target)
    out_dir = Path(out_dir)
    rows: dict[str, list[dict]] = {s: [] for s in contexts}
    total = sum(len(c) for c in contexts.values())
    with (
        JsonlWriter(out_dir / "results.jsonl", mode="w") as w,
        tqdm(total=total, desc="ttt-tau", disable=not progress) as bar,
    ):
        for s, ctxs in contexts.items():
            for ctx in ctxs:
                row = tau_before_after(target, draft, ctx, ttt, max_new_tokens=max_new_tokens, stop=stop)
                w.write(row)
                rows[s].append(row)
                bar.update(1)
                bar.set_postfix(delta_tau=f"{row['delta_tau']:+.2f}")
    if not any(rows.values()):
        raise DraftGuideError(f"no contexts in {', '.join(sets)}")
    summary = {
        "sets": {s: tau_summary(r) for s, r in rows.items() if r},
        "all": tau_summary([r for rs in rows.values() for r in rs]),
        "ttt": asdict(ttt),
        "max_new_tokens": max_new_tokens,
        "context_tokens_doc": context_tokens,
        "limit": limit,
        "command": command,
        "environment": environment(),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def tau_table(summary: dict) -> str:
    from draftguide.reporting.runs import fmt

    head = (
        f"{'set':<18} {'n':>3} {'ctx tok':>7} {'tau base':>8} {'tau ttt':>8} {'delta (95% CI)':>24} "
        f"{'loss before->after':>19} {'ttt s':>6}"
    )
    lines = [head]
    for name, s in [*summary["sets"].items(), ("all", summary["all"])]:
        lo, hi = s["delta_tau_ci95"]
        lines.append(
            f"{name:<18} {s['n_contexts']:>3} {fmt(s['mean_context_tokens'], '.0f'):>7} {fmt(s['tau_base'], '.3f'):>8} "
            f"{fmt(s['tau_ttt'], '.3f'):>8} {fmt(s['delta_tau_mean'], '+.3f'):>8} [{fmt(lo, '+.3f')}, "
            f"{fmt(hi, '+.3f')}] "
            f"{fmt(s['mean_context_loss_before'], '.3f'):>8} -> {fmt(s['mean_context_loss_after'], '.3f'):<7} "
            f"{fmt(s['mean_ttt_s'], '.2f'):>6}"
        )
    return "\n".join(lines)


# -- teacher-forced acceptance ------------------------------------------------------------------------
@torch.no_grad()
def replay_acceptance(
    draft, target, features: torch.Tensor, ids: torch.Tensor, n_prompt: int, max_len: int | None = None
) -> list[int]:
    """Acceptance lengths that greedy `speculative_generate` from `ids[:, :n_prompt]` would have, given that
    `ids` is the target's greedy sequence (prompt + continuation; it ends at a stop token or at `max_len`,
    the prompt plus max_new_tokens). One multi-anchor pass drafts a block at every continuation position;
    the walk then keeps the blocks decoding would visit. Blocks cut short by `max_len` are drafted at their
    shorter size, as decoding does. Features are those of one full forward (decoding gets them piecewise:
    the same up to float rounding).
    # features: [1, L, n*d], ids: [1, L]"""
    from draftguide.modeling.draft import multi_block_hidden

    L, B = ids.shape[1], draft.block_size
    max_len = max_len or L
    starts = list(range(n_prompt, L - 1))
    if not starts:
        return []
    hidden = multi_block_hidden(draft, target, features, ids, torch.tensor([starts], device=ids.device))[0]  # [m, B, d]
    lengths, start = [], n_prompt
    while start + 1 < L:
        dlen = min(B, max_len - start)
        if dlen < B:  # the last block is shorter in decoding too: draft it at that size
            h = multi_block_hidden(
                draft, target, features, ids, torch.tensor([[start]], device=ids.device), block_size=dlen
            )
            g = draft.logits(h[0, 0, 1:], target).argmax(-1)
        else:
            g = draft.logits(hidden[start - n_prompt, 1:], target).argmax(-1)  # only the ~m/tau visited blocks
        truth = ids[0, start + 1 : start + dlen]
        acc = int((g[: len(truth)] == truth).long().cumprod(0).sum())
        produced = min(acc + 1, L - start - 1)
        lengths.append(produced)
        start += produced
    return lengths


def _tau(lengths: list[int]) -> float:
    return sum(lengths) / len(lengths) if lengths else float("nan")


# -- the sweep ----------------------------------------------------------------------------------------
@dataclass
class SweepTask:
    task_id: str
    prompt: torch.Tensor  # [1, P]
    answer_feats: torch.Tensor  # [1, P+A, n*d] features of prompt + reference answer
    answer_ids: torch.Tensor  # [1, P+A]
    target_logp: np.ndarray  # [A] target log p of the reference answer tokens
    cont_feats: torch.Tensor  # [1, P+C, n*d] features of prompt + the target's greedy continuation
    cont_ids: torch.Tensor  # [1, P+C]
    max_len: int


@torch.inference_mode()
def prepare_sweep_task(target, draft, task, *, max_new_tokens: int, stop: list[int]) -> SweepTask:
    """Everything the sweep needs from the target, computed once per task: two target forwards and one
    greedy decoding."""
    from draftguide.decode.speculative import greedy_generate
    from draftguide.experiments.diagnostic import gold_scores
    from draftguide.modeling.prompts import check_length

    dev = next(target.parameters()).device
    P = len(task.prompt_ids)
    check_length(
        target, P + len(task.answer_ids), where=f"task {task.task_id!r}", what="prompt with its reference answer"
    )
    check_length(target, P, max_new_tokens, where=f"task {task.task_id!r}")
    ids = torch.tensor([task.prompt_ids + task.answer_ids], device=dev)
    out = target(ids, output_hidden_states=True, logits_to_keep=len(task.answer_ids) + 1)
    target_logp = gold_scores(out.logits[0, :-1], ids[0, P:])["logp"]
    feats = extract_features(out.hidden_states, draft.target_layer_ids)
    cont, _ = greedy_generate(target, ids[:, :P], max_new_tokens, stop)
    cfeats = extract_features(
        target(cont, output_hidden_states=True, logits_to_keep=1).hidden_states, draft.target_layer_ids
    )
    return SweepTask(task.task_id, ids[:, :P], feats, ids, target_logp, cfeats, cont, P + max_new_tokens)


@torch.no_grad()
def sweep_point(draft, target, t: SweepTask, eval_anchors: list[int], weights) -> dict:
    """The three sweep metrics of one (adapted) draft on one task."""
    from draftguide.experiments.diagnostic import draft_scores
    from draftguide.training.ttt import context_loss

    P = t.prompt.shape[1]
    loss, _ = context_loss(draft, target, t.answer_feats[:, :P], t.prompt, eval_anchors, weights)
    logp = draft_scores(draft, target, t.answer_feats, t.answer_ids, P, ["next"])["next"]["logp"]
    acc = replay_acceptance(draft, target, t.cont_feats, t.cont_ids, P, t.max_len)
    return {"context_loss": loss, "logp_gap": float(np.mean(logp - t.target_logp)), "acceptance": acc, "tau": _tau(acc)}


def sweep_task(draft, target, t: SweepTask, steps: list[int], lrs: list[float], ranks: list[int], ttt) -> list[dict]:
    """One TTT run per (lr, rank) up to max(steps), measured at every requested step count (the run is the
    same up to step s as a run of s steps: constant lr, same anchors). Step 0 is the base draft, measured once."""
    from draftguide.training.train import loss_weights
    from draftguide.training.ttt import evenly_spaced_anchors, ttt_adapt

    P = t.prompt.shape[1]
    eval_at = evenly_spaced_anchors(P, 64)
    weights = loss_weights(draft.block_size).to(t.prompt.device)
    base_point = sweep_point(draft, target, t, eval_at, weights)
    rows = []
    for lr, rank in itertools.product(lrs, ranks):
        t0 = time.perf_counter()

        def on_step(step, d, lr=lr, rank=rank):
            if step in steps:
                point = base_point if step == 0 else sweep_point(d, target, t, eval_at, weights)
                rows.append({"task_id": t.task_id, "lr": lr, "rank": rank, "steps": step} | point)

        with ttt_adapt(
            draft,
            target,
            t.prompt,
            features=t.answer_feats[:, :P],
            on_step=on_step,
            **ttt.kwargs(steps=max(steps), lr=lr, rank=rank),
        ) as adapted:
            seconds = adapted.report.seconds
        for r in rows[-len(steps) :]:
            r["ttt_s_full_run"] = seconds
            r["wall_s"] = time.perf_counter() - t0
    return rows


def sweep_summary(rows: list[dict], n_boot: int = 1000, seed: int = 0, by_tau: bool = True) -> dict:
    """Per (lr, rank, steps): mean context loss, mean per-task log-prob gap (draft - target, next mode) and tau
    (pooled over verify steps) with its per-task change from the base draft, each with a bootstrap CI over tasks.
    `best` = the config with the highest tau (ties: the larger log-prob gap); `by_tau=False` (an aligned
    readout, which cannot speculate): the largest log-prob gap (ties: tau)."""
    base = {r["task_id"]: r["tau"] for r in rows if r["steps"] == 0}
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault((r["lr"], r["rank"], r["steps"]), []).append(r)
    table = []
    for (lr, rank, steps), rs in sorted(configs.items()):
        acc = [a for r in rs for a in r["acceptance"]]
        gaps, dtau = [r["logp_gap"] for r in rs], [r["tau"] - base[r["task_id"]] for r in rs if r["task_id"] in base]
        table.append(
            {
                "lr": lr,
                "rank": rank,
                "steps": steps,
                "n_tasks": len(rs),
                "context_loss": float(np.mean([r["context_loss"] for r in rs])),
                "logp_gap": float(np.mean(gaps)),
                "logp_gap_ci95": list(bootstrap_ci(gaps, n_boot=n_boot, seed=seed)),
                "tau": sum(acc) / max(len(acc), 1),
                "delta_tau": float(np.mean(dtau)) if dtau else None,
                "delta_tau_ci95": list(bootstrap_ci(dtau, n_boot=n_boot, seed=seed)) if dtau else None,
            }
        )
    if by_tau:
        best = max(table, key=lambda r: (r["tau"], r["logp_gap"]))
        rule = "highest tau (pooled over verify steps); ties: larger log-prob gap"
    else:
        best = max(table, key=lambda r: (r["logp_gap"], r["tau"]))
        rule = "largest log-prob gap (an aligned readout cannot speculate); ties: tau"
    return {"table": table, "best": best, "best_rule": rule}


def run_sweep_ttt(
    target,
    tokenizer,
    draft,
    tasks: list[dict],
    out_dir,
    ttt,
    *,
    steps: list[int],
    lrs: list[float],
    ranks: list[int],
    max_new_tokens: int = 48,
    command: str = "",
    progress: bool = True,
) -> dict:
    """The sweep over the tasks with reference answers; writes `points.jsonl`, `summary.json`, `sweep.png`
    and `report.md`."""
    from tqdm.auto import tqdm

    from draftguide.experiments.diagnostic import prepare_tasks
    from draftguide.modeling.prompts import stop_token_ids
    from draftguide.reporting.plots import ttt_sweep_figure
    from draftguide.reporting.runs import JsonlWriter, environment, write_json
    from draftguide.reporting.ttt_report import sweep_markdown

    prepared = prepare_tasks(tasks, tokenizer)
    if not prepared.tasks:
        raise DraftGuideError(f"none of the {len(tasks)} tasks has a reference answer")
    stop = stop_token_ids(tokenizer, target)
    out_dir = Path(out_dir)
    rows = []
    with JsonlWriter(out_dir / "points.jsonl", mode="w") as w:
        for task in tqdm(prepared.tasks, desc="sweep ttt", disable=not progress):
            t = prepare_sweep_task(target, draft, task, max_new_tokens=max_new_tokens, stop=stop)
            for r in sweep_task(draft, target, t, steps, lrs, ranks, ttt):
                w.write(r)
                rows.append(r)
    aligned = bool(getattr(draft, "context_includes_anchor", False))
    tau_method = "teacher-forced replay of greedy speculative decoding on the target's greedy continuation"
    if aligned:  # the replay gives each block its anchor's own features, which live speculation never has
        tau_method += " (an aligned readout cannot speculate: its replayed tau is not reachable by decoding)"
    summary = sweep_summary(rows, by_tau=not aligned) | {
        "n_tasks": len(prepared.tasks),
        "n_skipped": len(prepared.skipped),
        "grid": {"steps": steps, "lr": lrs, "rank": ranks},
        "ttt": asdict(ttt),
        "max_new_tokens": max_new_tokens,
        "command": command,
        "environment": environment(),
        "tau_method": tau_method,
    }
    summary["figure"] = ttt_sweep_figure(summary, out_dir / "sweep.png")
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.md").write_text(sweep_markdown(summary))
    return summary


def parse_list(text: str, kind, flag: str) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DraftGuideError(f"{flag} {text!r}: expected a comma list of {kind.__name__} values") from None
    if not vals:
        raise DraftGuideError(f"{flag} is empty")
    return sorted(set(vals))


__all__ = [
    "Context",
    "load_contexts",
    "replay_acceptance",
    "run_sweep_ttt",
    "run_ttt_tau",
    "sweep_summary",
    "tau_summary",
]
