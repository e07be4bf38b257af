"""The diagnostic's run folder: tokens.jsonl, summary.json, PNG figures (matplotlib, Agg) and report.md.

The numbers come from `diagnostic.py`; this module only reads them, draws and writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .diagnostic import BUCKETS, CONTROLS, MODES, PATHWAYS
from .errors import DraftGuideError

COLOURS = {"target": "#4c72b0", "draft": "#dd8452", "ttt": "#55a868", "noise": "#8c8c8c", "random": "#c7c7c7"}
MAX_HEATMAP_TOKENS = 40


# -- inputs from other runs ---------------------------------------------------------------------------
def results_field(path: str | Path, field: str) -> dict[str, object]:
    """task_id -> `field` of the finished rows (status ok) of an eval `results.jsonl`."""
    from .prompts import read_jsonl

    rows = read_jsonl(path)
    out = {str(r["task_id"]): r.get(field) for r in rows if r.get("task_id") is not None and r.get("status", "ok") == "ok"}
    if not out:
        raise DraftGuideError(f"'{path}' has no finished task rows (task_id, status ok)")
    return out


def solved_from(path: str | Path) -> dict[str, bool]:
    return {k: bool(v) for k, v in results_field(path, "score").items() if v is not None}


def compute_solved(target, tokenizer, tasks: list[dict], out_dir: Path, max_new_tokens: int, settings: dict,
                   progress: bool = True) -> tuple[dict[str, bool], Path]:
    """The target's greedy answers scored by the rule checks, through `draftguide eval`'s runner (resumable,
    in `out_dir/solve`). Tasks without checks stay unknown (no LLM judge here)."""
    from .evaluate import RESULTS, run_eval

    checked = [t for t in tasks if t.get("checks")]
    folder = out_dir / "solve"
    if not checked:
        return {}, folder
    run_eval(target, tokenizer, checked, folder, method="greedy", max_new_tokens=max_new_tokens, judge="rules",
             settings=settings, progress=progress)
    return solved_from(folder / RESULTS), folder


# -- the run ------------------------------------------------------------------------------------------
def run_diagnose(target, tokenizer, draft, tasks: list[dict], out_dir, *, modes=MODES, controls=CONTROLS,
                 references: dict[str, str] | None = None, solved: dict[str, bool] | None = None,
                 command: str = "", settings: dict | None = None, n_boot: int = 1000, seed: int = 0,
                 random_draft=None, progress: bool = True, ttt=None) -> dict:
    """Score `tasks`, write `tokens.jsonl`, `summary.json`, the figures and `report.md` into `out_dir`.
    `ttt` (a `ttt.TTTConfig`): also score the draft adapted on each task's context (pathway `ttt`, beside the
    base draft), and write the per-task adaptation reports to `ttt.jsonl`."""
    from .diagnostic import diagnose, prepare_tasks, summarize, token_rows
    from .runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes, controls = list(modes), list(controls)
    prepared = prepare_tasks(tasks, tokenizer, references, solved)
    if not prepared.tasks:
        raise DraftGuideError(f"none of the {len(tasks)} tasks has a reference answer: pass --reference-from RESULTS.jsonl")
    t0 = time.perf_counter()
    records = diagnose(target, draft, prepared, modes=modes, controls=controls, random_draft=random_draft,
                       seed=seed, progress=progress, ttt=ttt)
    score_s = time.perf_counter() - t0
    with JsonlWriter(out_dir / "tokens.jsonl", mode="w") as w:
        for row in token_rows(records, modes):
            w.write(row)
    stats = summarize(records, modes, n_boot=n_boot, seed=seed)
    summary = {
        "n_tasks": stats["n_tasks"], "n_tokens": stats["n_tokens"], "n_tasks_in": len(tasks),
        "n_skipped": len(prepared.skipped), "skipped": prepared.skipped[:100],
        "n_solved": sum(t.solved is True for t in prepared.tasks), "n_failed": sum(t.solved is False for t in prepared.tasks),
        "n_solve_unknown": sum(t.solved is None for t in prepared.tasks),
        "verdict": stats["verdict"]["verdict"], "verdict_detail": stats["verdict"],
        "block_size": draft.block_size, "controls": controls, "modes": stats["modes"],
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "task"},
        "score_s": score_s, "command": command, "settings": settings or {}, "environment": environment(),
    }
    if ttt is not None:
        summary["ttt"] = ttt_summary(records, stats, ttt, out_dir)
    figures = make_figures(records, summary, out_dir, modes)
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.md").write_text(report_markdown(summary, figures))
    return summary


def ttt_summary(records: list[dict], summarized: dict, ttt, out_dir: Path) -> dict:
    """The TTT part of `summary.json` (verdict of the adapted draft, its gain over the base draft, the mean
    adaptation report); writes one report per task to `ttt.jsonl`."""
    from dataclasses import asdict

    from .runs import JsonlWriter

    reports = {r["task_id"]: r["ttt_report"] for r in records}
    with JsonlWriter(out_dir / "ttt.jsonl", mode="w") as w:
        for tid, rep in reports.items():
            w.write({"task_id": tid} | rep)
    mean = {k: float(np.mean([r[k] for r in reports.values()])) for k in ("loss_before", "loss_after", "seconds", "eval_seconds")}
    return {"config": asdict(ttt), "verdict": summarized["ttt"]["verdict"]["verdict"],
            "verdict_detail": summarized["ttt"]["verdict"], "gain_over_base": summarized["ttt"]["gain_over_base"],
            "n_tasks": len(reports), "mean_context_loss_before": mean["loss_before"],
            "mean_context_loss_after": mean["loss_after"], "mean_ttt_seconds": mean["seconds"],
            "mean_eval_seconds": mean["eval_seconds"]}


# -- figures ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _err(stat: dict, key: str) -> tuple[float, list[float]]:
    v = stat[key]
    lo, hi = stat["ci95"]
    return v, [max(v - lo, 0.0), max(hi - v, 0.0)]


def make_figures(records: list[dict], summary: dict, out_dir: Path, modes: list[str]) -> dict[str, dict]:
    """PNG files, each with its caption: {file: {"title", "caption"}}."""
    plt = _plt()
    figs: dict[str, dict] = {}
    mode0 = "next" if "next" in modes else modes[0]

    # heatmap: tasks x answer tokens of log p_draft - log p_target
    tasks = sorted({r["task"] for r in records})
    width = min(MAX_HEATMAP_TOKENS, 1 + max(r["token_index"] for r in records))
    m = np.full((len(tasks), width), np.nan)
    row_of = {t: i for i, t in enumerate(tasks)}
    for r in records:
        if r["token_index"] < width:
            m[row_of[r["task"]], r["token_index"]] = r[mode0]["draft"]["logp"] - r["target"]["logp"]
    lim = float(np.nanmax(np.abs(m))) or 1.0
    fig, ax = plt.subplots(figsize=(min(2 + 0.3 * width, 14), min(2 + 0.12 * len(tasks), 30)))
    im = ax.imshow(m, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log p_draft - log p_target (nats)")
    ax.set_xlabel("answer token index")
    ax.set_ylabel("task")
    ax.set_title(f"draft vs target per token ({mode0} mode; blue = draft higher)")
    figs["heatmap.png"] = _save(plt, fig, out_dir / "heatmap.png",
                                f"log p_draft - log p_target per answer token, {mode0} mode, {len(tasks)} tasks x first {width} "
                                f"tokens ({summary['n_tokens']} tokens in all); blank = no token.")

    # rank and log p by block offset
    if "block" in modes:
        g = summary["modes"]["block"]
        ks = sorted(int(k.split(":")[1]) for k in g if k.startswith("offset:"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for n in [p for p in PATHWAYS if p in g["all"]["median_rank"]]:
            for ax, key, stat in ((axes[0], "median_rank", "median"), (axes[1], "mean_logp", "mean")):
                vals = [_err(g[f"offset:{k}"][key][n], stat) for k in ks]
                ax.errorbar(ks, [v for v, _ in vals], yerr=np.array([e for _, e in vals]).T, marker="o", capsize=3,
                            label=n, color=COLOURS[n])
        axes[0].set_yscale("log")
        axes[0].set_ylabel("median rank of the gold token (1 = top)")
        axes[1].set_ylabel("mean log p of the gold token")
        for ax in axes:
            ax.set_xlabel("block offset k")
            ax.legend()
        n_k = ", ".join(f"k={k}: {g[f'offset:{k}']['n_tokens']}" for k in ks)
        figs["rank_by_offset.png"] = _save(plt, fig, out_dir / "rank_by_offset.png",
                                           f"block mode, by offset k (tokens {n_k}); bars: 95% CI over tasks.")

    # effect bars with controls beside, by bucket and by category
    for mode in modes:
        g = summary["modes"][mode]
        for kind, prefix in (("bucket", "bucket:"), ("category", "category:")):
            keys = [k for k in g if k.startswith(prefix)]
            if kind == "bucket":
                keys = [f"bucket:{b}" for _, b in BUCKETS if f"bucket:{b}" in g]
            names = [n for n in ("draft", "ttt", *CONTROLS) if n in g["all"].get("logp_minus_target", {})]
            fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4.5))
            w = 0.8 / max(len(names), 1)
            for i, n in enumerate(names):
                vals = [_err(g[k]["logp_minus_target"][n], "mean") for k in keys]
                ax.bar(np.arange(len(keys)) + (i - (len(names) - 1) / 2) * w, [v for v, _ in vals], w,
                       yerr=np.array([e for _, e in vals]).T, capsize=3, label=n, color=COLOURS[n])
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(keys)))
            ax.set_xticklabels([f"{k[len(prefix):]}\n(n={g[k]['n_tokens']})" for k in keys], fontsize=8,
                               rotation=0 if kind == "bucket" else 20, ha="center" if kind == "bucket" else "right")
            ax.set_ylabel("mean log p - log p_target (nats)")
            ax.set_title(f"{mode} mode: effect of the draft and the controls, by {kind}")
            ax.legend()
            name = f"by_{kind}_{mode}.png"
            figs[name] = _save(plt, fig, out_dir / name,
                               f"{mode} mode: mean (log p - log p_target) by {'target-confidence bucket' if kind == 'bucket' else kind}; "
                               "draft, noise-feature control and random-draft control side by side; bars: 95% CI over tasks.")
    return figs


def _save(plt, fig, path: Path, caption: str) -> dict:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"caption": caption}


# -- report.md ----------------------------------------------------------------------------------------
def _fmt(stat: dict, key: str, digits: int = 2) -> str:
    lo, hi = stat["ci95"]
    return f"{stat[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _table(g: dict, keys: list[str], label: str) -> list[str]:
    names = [n for n in PATHWAYS if n in g["all"]["mean_logp"]]
    others = names[1:]
    head = [label, "tokens", "tasks", *(f"log p {n}" for n in names), *(f"rank {n}" for n in names),
            *(f"Δlog p {n}" for n in others), *(f"rank win/tie {n}" for n in others)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        s = g[k]
        cells = [k.split(":", 1)[-1], str(s["n_tokens"]), str(s["n_tasks"])]
        cells += [_fmt(s["mean_logp"][n], "mean") for n in names]
        cells += [_fmt(s["median_rank"][n], "median", 1) for n in names]
        cells += [_fmt(s["logp_minus_target"][n], "mean") for n in others]
        cells += [f"{_fmt(s['rank_vs_target'][n]['win'], 'mean')} / {s['rank_vs_target'][n]['tie']['mean']:.2f}" for n in others]
        out.append("| " + " | ".join(cells) + " |")
    return out


def report_markdown(summary: dict, figures: dict[str, dict]) -> str:
    v = summary["verdict_detail"]
    lo, hi = v["ci95"]
    cmd = summary.get("command") or "(library call)"
    lines = [
        "# Readout diagnostic: draft (deep) vs target (shallow) on gold answer tokens", "",
        f"Command: `{cmd}`", "",
        f"{summary['n_tasks']} tasks, {summary['n_tokens']} answer tokens (of {summary['n_tasks_in']} tasks: "
        f"{summary['n_skipped']} skipped without a reference answer); target solved {summary['n_solved']}, failed "
        f"{summary['n_failed']}, unknown {summary['n_solve_unknown']}. Draft block size {summary['block_size']}; "
        f"controls: {', '.join(summary['controls']) or 'none'}.", "",
        f"## Verdict: **{summary['verdict']}**", "",
        f"Mean per-task (log p_draft - log p_target) on {v['basis']}, {v['mode']} mode: {v['mean_per_task_logp_diff']:.3f} nats, "
        f"95% CI [{lo:.3f}, {hi:.3f}] (n = {v['n_tasks']} tasks, {v['n_tokens']} tokens).", "",
        f"Rule: {v['rule']}.", "",
        "Tables: mean log p and median rank of the gold token per pathway (target = last layer -> lm_head; draft = "
        "the DFlash readout; noise = the draft fed norm-matched Gaussian noise instead of target features; random = "
        "an untrained draft of the same shape), the difference from the target, and the rate at which each ranks the "
        "gold token strictly better than the target (win) or equally (tie). [95% bootstrap CI, resampling tasks.] "
        "Rank and log p are the headline: p win rates favour flat distributions (`p_win_rate` in summary.json).", "",
    ]
    for mode, g in summary["modes"].items():
        lines += [f"## Mode `{mode}`", ""]
        sections = [("overall", ["all", *(k for k in g if k.startswith("task:"))], "tasks"),
                    ("by target-confidence bucket", [f"bucket:{b}" for _, b in BUCKETS if f"bucket:{b}" in g], "bucket"),
                    ("in context / first token", [k for k in g if k.startswith(("in_context:", "first:"))], "tag"),
                    ("by category", [k for k in g if k.startswith("category:")], "category"),
                    ("by subcategory", [k for k in g if k.startswith("subcategory:")], "subcategory"),
                    ("by block offset k", [k for k in g if k.startswith("offset:")], "k")]
        for title, keys, label in sections:
            if keys:
                lines += [f"### {title} (n = {summary['n_tasks']} tasks)", "", *_table(g, keys, label), ""]
    lines += ttt_markdown(summary)
    lines += ["## Figures", ""]
    for name, f in figures.items():
        lines += [f"![{name}]({name})", "", f"*{name}*: {f['caption']} Command: `{cmd}`.", ""]
    return "\n".join(lines)


def ttt_markdown(summary: dict) -> list[str]:
    """The TTT section of report.md (empty without --ttt)."""
    t = summary.get("ttt")
    if not t:
        return []
    c, v = t["config"], t["verdict_detail"]
    lines = [
        "## Test-time training", "",
        f"Pathway `ttt`: the draft with LoRA adapters (rank {c['rank']}, modules {', '.join(c['target_modules'])}) trained "
        f"{c['steps']} steps at lr {c['lr']:g} ({c['anchors_per_step']} random anchors per step) on each task's prompt "
        "(system and user turns), reset before the next task; columns `draft` are the base draft. Controls run the base draft.", "",
        f"Context loss (the draft training loss on the prompt): {t['mean_context_loss_before']:.3f} before, "
        f"{t['mean_context_loss_after']:.3f} after (mean over {t['n_tasks']} tasks); TTT {t['mean_ttt_seconds']:.2f} s per task.", "",
        f"Verdict of the adapted draft: **{t['verdict']}** (mean per-task log p_ttt - log p_target on {v['basis']}: "
        f"{v['mean_per_task_logp_diff']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]).", "",
        "| mode | mean per-task log p_ttt - log p_draft | 95% CI | tasks |", "|---|---|---|---|",
    ]
    for mode, g in t["gain_over_base"].items():
        lines.append(f"| {mode} | {g['mean_per_task_logp_gain']:.3f} | [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] | {g['n_tasks']} |")
    return lines + [""]
