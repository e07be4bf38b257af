"""The diagnostic's run folder: tokens.jsonl, summary.json, PNG figures (matplotlib, Agg) and report.md.

The numbers come from `diagnostic.py`; this module only reads them, draws and writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from draftguide.errors import DraftGuideError
from draftguide.experiments.diagnostic import DEFAULT_CONTROLS, DEFAULT_LEAD, EQUIV_MARGIN, MODES


# -- inputs from other runs ---------------------------------------------------------------------------
def results_field(path: str | Path, field: str) -> dict[str, object]:
    """task_id -> `field` of the finished rows (status ok) of an eval `results.jsonl`."""
    from draftguide.modeling.prompts import read_jsonl

    rows = read_jsonl(path)
    out = {
        str(r["task_id"]): r.get(field) for r in rows if r.get("task_id") is not None and r.get("status", "ok") == "ok"
    }
    if not out:
        raise DraftGuideError(f"'{path}' has no finished task rows (task_id, status ok)")
    return out


def solved_from(path: str | Path) -> dict[str, bool]:
    return {k: bool(v) for k, v in results_field(path, "score").items() if v is not None}


def compute_solved(
    target, tokenizer, tasks: list[dict], out_dir: Path, max_new_tokens: int, settings: dict, progress: bool = True
) -> tuple[dict[str, bool], Path]:
    """The target's greedy answers scored by the rule checks, through `draftguide eval`'s runner (resumable,
    in `out_dir/solve`). Tasks without checks stay unknown (no LLM judge here)."""
    from draftguide.experiments.evaluate import RESULTS, run_eval

    checked = [t for t in tasks if t.get("checks")]
    folder = out_dir / "solve"
    if not checked:
        return {}, folder
    run_eval(
        target,
        tokenizer,
        checked,
        folder,
        method="greedy",
        max_new_tokens=max_new_tokens,
        judge="rules",
        settings=settings,
        progress=progress,
    )
    return solved_from(folder / RESULTS), folder


# -- the run ------------------------------------------------------------------------------------------
def run_diagnose(
    target,
    tokenizer,
    readouts,
    tasks: list[dict],
    out_dir,
    *,
    modes=MODES,
    controls=DEFAULT_CONTROLS,
    references: dict[str, str] | None = None,
    solved: dict[str, bool] | None = None,
    responses: dict[str, str] | None = None,
    frame: str = "framed",
    lead: str = DEFAULT_LEAD,
    margin: float = EQUIV_MARGIN,
    command: str = "",
    argv: list[str] | None = None,
    settings: dict | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    random_drafts=None,
    progress: bool = True,
    ttt=None,
) -> dict:
    """Score `tasks` with every readout (`readouts`: {name: draft}, or one draft named `draft`), write
    `tokens.jsonl`, `summary.json`, the figures and `report.md` into `out_dir`. `responses` (task_id -> the
    target's greedy response) frame the reference in `framed` mode and tag tokens the response lacks.
    `command`/`argv`: what was run, recorded as given (the CLI passes its own argv).
    `ttt` (a `ttt.TTTConfig`): also score the first readout adapted on each task's context (pathway `ttt`),
    and write the per-task adaptation reports to `ttt.jsonl`."""
    from collections import Counter

    from draftguide.experiments.diagnostic import as_readouts, diagnose, prepare_tasks, summarize, token_rows
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes, controls, readouts = list(modes), list(controls), as_readouts(readouts)
    prepared = prepare_tasks(tasks, tokenizer, references, solved, responses=responses, frame=frame, lead=lead)
    if not prepared.tasks:
        raise DraftGuideError(
            f"none of the {len(tasks)} tasks has a reference answer: pass --reference-from RESULTS.jsonl"
        )
    t0 = time.perf_counter()
    records = diagnose(
        target,
        readouts,
        prepared,
        modes=modes,
        controls=controls,
        random_drafts=random_drafts,
        seed=seed,
        progress=progress,
        ttt=ttt,
    )
    score_s = time.perf_counter() - t0
    with JsonlWriter(out_dir / "tokens.jsonl", mode="w") as w:
        for row in token_rows(records, modes):
            w.write(row)
    stats = summarize(records, modes, n_boot=n_boot, seed=seed, margin=margin)
    summary = {
        "n_tasks": stats["n_tasks"],
        "n_tokens": stats["n_tokens"],
        "n_tasks_in": len(tasks),
        "n_skipped": len(prepared.skipped),
        "skipped": prepared.skipped[:100],
        "n_solved": sum(t.solved is True for t in prepared.tasks),
        "n_failed": sum(t.solved is False for t in prepared.tasks),
        "n_solve_unknown": sum(t.solved is None for t in prepared.tasks),
        "n_first_tokens": sum(r["first"] for r in records),
        "readouts": stats["readouts"],
        "verdict": stats["verdict"]["verdict"],
        "verdict_detail": stats["verdict"],
        "verdicts": {k: v["verdict"] for k, v in stats["verdicts"].items()},
        "verdict_details": stats["verdicts"],
        "margin": margin,
        "answer_frame": {
            "mode": frame,
            "lead": lead if frame == "framed" else None,
            "tasks_by_frame": dict(Counter(t.frame for t in prepared.tasks)),
        },
        "block_size": next(iter(readouts.values())).block_size,
        "block_sizes": {k: getattr(r, "block_size", None) for k, r in readouts.items()},
        "controls": controls,
        "modes": stats["modes"],
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "task"},
        "score_s": score_s,
        "command": command,
        "argv": list(argv) if argv is not None else None,
        "settings": settings or {},
        "environment": environment(),
    }
    if ttt is not None:
        summary["ttt"] = ttt_summary(records, stats, ttt, out_dir)
    from draftguide.reporting.plots import diagnostic_figures

    figures = diagnostic_figures(records, summary, out_dir, modes)
    write_json(out_dir / "summary.json", summary)
    from draftguide.reporting.diagnostic_report import diagnostic_markdown

    (out_dir / "report.md").write_text(diagnostic_markdown(summary, figures))
    return summary


def ttt_summary(records: list[dict], summarized: dict, ttt, out_dir: Path) -> dict:
    """The TTT part of `summary.json` (verdict of the adapted draft, its gain over the base draft, the mean
    adaptation report); writes one report per task to `ttt.jsonl`."""
    from dataclasses import asdict

    from draftguide.reporting.runs import JsonlWriter

    reports = {r["task_id"]: r["ttt_report"] for r in records}
    with JsonlWriter(out_dir / "ttt.jsonl", mode="w") as w:
        for tid, rep in reports.items():
            w.write({"task_id": tid} | rep)
    mean = {
        k: float(np.mean([r[k] for r in reports.values()]))
        for k in ("loss_before", "loss_after", "seconds", "eval_seconds")
    }
    return {
        "config": asdict(ttt),
        "verdict": summarized["ttt"]["verdict"]["verdict"],
        "verdict_detail": summarized["ttt"]["verdict"],
        "gain_over_base": summarized["ttt"]["gain_over_base"],
        "n_tasks": len(reports),
        "mean_context_loss_before": mean["loss_before"],
        "mean_context_loss_after": mean["loss_after"],
        "mean_ttt_seconds": mean["seconds"],
        "mean_eval_seconds": mean["eval_seconds"],
    }
