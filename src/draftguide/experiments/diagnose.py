"""The diagnostic's run folder: tokens.jsonl, summary.json, PNG figures (matplotlib, Agg) and report.md.

The numbers come from `diagnostic.py`; this module only reads them, draws and writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from draftguide.errors import DraftGuideError
from draftguide.experiments.diagnostic import BUCKETS, DEFAULT_CONTROLS, DEFAULT_LEAD, EQUIV_MARGIN, MODES

PALETTE = ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#c7c7c7"]


def colour(name: str, names: list[str]) -> str:
    """target blue; readouts, `ttt` and controls from one palette, in the order the run lists them."""
    return "#4c72b0" if name == "target" else PALETTE[names.index(name) % len(PALETTE)] if name in names else "#333333"


MAX_HEATMAP_TOKENS = 40


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

    from draftguide.experiments.diagnostic import _as_readouts, diagnose, prepare_tasks, summarize, token_rows
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes, controls, readouts = list(modes), list(controls), _as_readouts(readouts)
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
    figures = make_figures(records, summary, out_dir, modes)
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.md").write_text(report_markdown(summary, figures))
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
    cmd = summary.get("command") or "(library call)"

    # heatmap per readout: tasks x answer tokens of log p_readout - log p_target
    tasks = sorted({r["task"] for r in records})
    width = min(MAX_HEATMAP_TOKENS, 1 + max(r["token_index"] for r in records))
    row_of = {t: i for i, t in enumerate(tasks)}
    for name in summary["readouts"]:
        m = np.full((len(tasks), width), np.nan)
        for r in records:
            if r["token_index"] < width:
                m[row_of[r["task"]], r["token_index"]] = r[mode0][name]["logp"] - r["target"]["logp"]
        lim = float(np.nanmax(np.abs(m))) or 1.0
        fig, ax = plt.subplots(figsize=(min(2 + 0.3 * width, 14), min(2 + 0.12 * len(tasks), 30)))
        im = ax.imshow(m, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax, label=f"log p_{name} - log p_target (nats)")
        ax.set_xlabel("answer token index (0 = the reference's first token)")
        ax.set_ylabel("task")
        ax.set_title(f"{name} vs target per token ({mode0} mode; blue = readout higher)")
        fname = "heatmap.png" if name == summary["readouts"][0] else f"heatmap_{_slug(name)}.png"
        figs[fname] = _save(
            plt,
            fig,
            out_dir / fname,
            f"log p_{name} - log p_target per answer token, {mode0} mode, {len(tasks)} tasks x first {width} "
            f"tokens ({summary['n_tokens']} tokens in all); blank = no token. Command: `{cmd}`.",
        )

    # rank and log p by block offset
    if "block" in modes:
        g = summary["modes"]["block"]
        ks = sorted(int(k.split(":")[1]) for k in g if k.startswith("offset:") and "|" not in k)
        names = list(g["all"]["median_rank"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for n in names:
            for ax, key, stat in ((axes[0], "median_rank", "median"), (axes[1], "mean_logp", "mean")):
                vals = [_err(g[f"offset:{k}"][key][n], stat) for k in ks]
                ax.errorbar(
                    ks,
                    [v for v, _ in vals],
                    yerr=np.array([e for _, e in vals]).T,
                    marker="o",
                    capsize=3,
                    label=n,
                    color=colour(n, names),
                )
        axes[0].set_yscale("log")
        axes[0].set_ylabel("median rank of the gold token (1 = top)")
        axes[1].set_ylabel("mean log p of the gold token")
        for ax in axes:
            ax.set_xlabel("block offset k")
            ax.legend(fontsize=7)
        n_k = ", ".join(f"k={k}: {g[f'offset:{k}']['n_tokens']}" for k in ks)
        figs["rank_by_offset.png"] = _save(
            plt,
            fig,
            out_dir / "rank_by_offset.png",
            f"block mode, by offset k (tokens {n_k}); bars: 95% CI over tasks. Command: `{cmd}`.",
        )

    # effect bars with controls beside, by bucket and by category, first and later tokens apart
    for mode in modes:
        g = summary["modes"][mode]
        names = [n for n in g["all"]["mean_logp"] if n != "target"]
        for kind, prefix in (("bucket", "bucket:"), ("category", "category:")):
            keys = [k for k in g if k.startswith(prefix) and "|" not in k]
            if kind == "bucket":
                keys = [f"bucket:{b}" for _, b in BUCKETS if f"bucket:{b}" in g]
            fig, axes = plt.subplots(1, 2, figsize=(2 * max(6, 1.6 * len(keys)), 4.8), sharey=True)
            w = 0.8 / max(len(names), 1)
            for ax, pos in zip(axes, ("first", "later")):
                here = [k for k in keys if f"{k}|{pos}" in g]
                for i, n in enumerate(names):
                    vals = [_err(g[f"{k}|{pos}"]["logp_minus_target"][n], "mean") for k in here]
                    ax.bar(
                        np.arange(len(here)) + (i - (len(names) - 1) / 2) * w,
                        [v for v, _ in vals],
                        w,
                        yerr=np.array([e for _, e in vals]).T.reshape(2, -1),
                        capsize=2,
                        label=n,
                        color=colour(n, names),
                    )
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xticks(np.arange(len(here)))
                ax.set_xticklabels(
                    [f"{k[len(prefix) :]}\n(n={g[f'{k}|{pos}']['n_tokens']})" for k in here],
                    fontsize=7,
                    rotation=0 if kind == "bucket" else 20,
                    ha="center" if kind == "bucket" else "right",
                )
                ax.set_title(f"{mode} mode, {pos} answer tokens, by {kind}", fontsize=9)
            axes[0].set_ylabel("mean log p - log p_target (nats)")
            axes[1].legend(fontsize=7)
            name = f"by_{kind}_{mode}.png"
            figs[name] = _save(
                plt,
                fig,
                out_dir / name,
                f"{mode} mode: mean (log p - log p_target) by "
                f"{'target-confidence bucket' if kind == 'bucket' else kind}, "
                "first answer tokens (left) and later ones (right); readouts and their null controls side by side; "
                f"bars: 95% CI over tasks. Command: `{cmd}`.",
            )
    return figs


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


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
    """One row per (group, pathway): n, mean log p, median rank, difference from the target, rank win/tie."""
    head = [label, "pathway", "tokens", "tasks", "log p", "median rank", "Δlog p vs target", "rank win / tie vs target"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        s = g[k]
        for n in s["mean_logp"]:
            diff = _fmt(s["logp_minus_target"][n], "mean") if n != "target" else "-"
            win = (
                f"{_fmt(s['rank_vs_target'][n]['win'], 'mean')} / {s['rank_vs_target'][n]['tie']['mean']:.2f}"
                if n != "target"
                else "-"
            )
            cells = [
                k.split(":", 1)[-1] if ":" in k else k,
                n,
                str(s["n_tokens"]),
                str(s["n_tasks"]),
                _fmt(s["mean_logp"][n], "mean"),
                _fmt(s["median_rank"][n], "median", 1),
                diff,
                win,
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _stat(x: dict | None) -> str:
    if not x or x.get("mean") is None:
        return "n/a"
    return f"{x['mean']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"


def verdict_markdown(name: str, v: dict) -> list[str]:
    """One readout's verdict: the call, why (the numbers that decided it), the gate and the numbers beside."""
    b = v.get("beside", {})
    lines = [
        f"### `{name}`: **{v['verdict']}**",
        "",
        f"Because: {v['because']}.",
        "",
        f"| statistic ({v['mode']} mode, per-task means, {v['n_tasks']} tasks) | mean [95% CI] | n tasks | decides |",
        "|---|---|---|---|",
        f"| log p_{name} - log p_target, all tasks (90% CI [{v['ci90'][0]:+.3f}, {v['ci90'][1]:+.3f}]) | "
        f"{v['mean_per_task_logp_diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {v['n_tasks']} | yes "
        "(primary) |",
    ]
    for c, g in v["vs_controls"].items():
        lines.append(
            f"| log p_{name} - log p_{c} (null control{', strongest' if c == v['strongest_control'] else ''}) | "
            f"{_stat(g)} | {g['n_tasks']} | yes (gate) |"
        )
    for key, label in (
        ("failed", f"log p_{name} - log p_target, tasks the target fails"),
        ("solved", f"log p_{name} - log p_target, tasks the target solves"),
        ("interaction_failed_minus_solved", "  failed minus solved (interaction)"),
        ("control_failed", f"log p_{v['strongest_control']} - log p_target, failed tasks (what selection alone gives)"),
        ("control_interaction_failed_minus_solved", f"  failed minus solved, for `{v['strongest_control']}`"),
        ("control_adjusted_interaction", f"  failed minus solved of log p_{name} - log p_{v['strongest_control']}"),
    ):
        if b.get(key):
            n = b[key].get("n_tasks", f"{b[key].get('n_failed')}+{b[key].get('n_solved')}")
            lines.append(f"| {label} | {_stat(b[key])} | {n} | no |")
    for pos in ("first", "later"):
        if b.get(pos):
            p = b[pos]
            lines.append(
                f"| {pos} answer tokens ({p['n_tokens']}): log p_{name} - log p_target | {_stat(p['vs_target'])} | "
                f"{p['vs_target']['n_tasks']} | no |"
            )
            for c, g in p["vs_controls"].items():
                lines.append(f"| {pos} answer tokens: log p_{name} - log p_{c} | {_stat(g)} | {g['n_tasks']} | no |")
    return lines + [""]


def report_markdown(summary: dict, figures: dict[str, dict]) -> str:
    cmd = summary.get("command") or "(library call)"
    fr = summary.get("answer_frame") or {"mode": "bare", "tasks_by_frame": {}}
    frames = ", ".join(f"{k} {n}" for k, n in sorted(fr["tasks_by_frame"].items()))
    frame_text = (
        "framed: each reference is scored where the target writes its answer, after its own greedy response up "
        "to the reference (frame `reference`), or up to the distractor it gave instead (`distractor`), else after "
        f"the lead {fr.get('lead')!r} (`lead`)"
        if fr["mode"] == "framed"
        else "bare: each reference is scored right after the generation prompt"
    )
    v0 = summary["verdict_detail"]
    lines = [
        "# Readout diagnostic: deep readouts vs the target's own (shallow) readout on gold answer tokens",
        "",
        f"Command: `{cmd}`",
        "",
        f"{summary['n_tasks']} tasks, {summary['n_tokens']} answer tokens "
        f"({summary.get('n_first_tokens', summary['n_tasks'])} "
        f"first tokens; of {summary['n_tasks_in']} tasks: {summary['n_skipped']} skipped without a reference answer); "
        "target "
        f"solved {summary['n_solved']}, failed {summary['n_failed']}, unknown {summary['n_solve_unknown']}. Readouts: "
        + ", ".join(
            f"`{k}` (block size {b})" for k, b in summary.get("block_sizes", {"draft": summary["block_size"]}).items()
        )
        + f"; null controls per readout: {', '.join(summary['controls']) or 'none'}. Answers {frame_text} ({frames}).",
        "",
        "## Verdict" + (f": **{summary['verdict']}**" if len(summary.get("readouts", [])) <= 1 else ""),
        "",
        f"Rule: {v0['rule']}.",
        "",
    ]
    for name, v in summary.get("verdict_details", {"draft": v0}).items():
        lines += verdict_markdown(name, v)
    lines += [
        "Pathways: target = last layer -> lm_head; each readout by its name; `<readout>.shuffle` = the readout fed the "
        "real target features of another task (aligned at the answer start); `<readout>.gauss` = Gaussian noise "
        "matched "
        "in mean and std per feature dimension; `<readout>.noise` = isotropic noise matched in norm per position and "
        "layer; `<readout>.random` = an untrained draft of the same shape (a sanity row only). Tables: mean log p and "
        "median rank of the gold token, the difference from the target, and the rate at which each ranks the gold "
        "token "
        "strictly better than the target (win) or equally (tie). [95% bootstrap CI, resampling tasks.] Tags: "
        "in_context = the token's reference word occurs as a whole word in the system/user turns; in_response = it "
        "occurs in the target's greedy response; missed = in context but not in the response. `|first` / `|later`: "
        "the reference's first token / the others.",
        "",
    ]
    for mode, g in summary["modes"].items():
        lines += [f"## Mode `{mode}`", ""]
        base = lambda pre: [k for k in g if k.startswith(pre) and "|" not in k]  # noqa: E731
        split = lambda ks: [x for k in ks for x in (k, f"{k}|first", f"{k}|later") if x in g]  # noqa: E731
        sections = [
            ("overall", split(["all", *base("task:")]), "tasks"),
            ("by target-confidence bucket", split([f"bucket:{b}" for _, b in BUCKETS if f"bucket:{b}" in g]), "bucket"),
            (
                "tags: whole word in context, in the greedy response, missed",
                split(base(("in_context:", "in_response:", "missed:"))),
                "tag",
            ),
            ("by answer frame", split(base("frame:")), "frame"),
            ("by category", split(base("category:")), "category"),
            ("by subcategory", base("subcategory:"), "subcategory"),
            ("by block offset k", split(base("offset:")), "k"),
        ]
        for title, keys, label in sections:
            if keys:
                lines += [f"### {title} (n = {summary['n_tasks']} tasks)", "", *_table(g, keys, label), ""]
    lines += ttt_markdown(summary)
    lines += ["## Figures", ""]
    for name, f in figures.items():
        lines += [f"![{name}]({name})", "", f"*{name}*: {f['caption']}", ""]
    return "\n".join(lines)


def ttt_markdown(summary: dict) -> list[str]:
    """The TTT section of report.md (empty without --ttt)."""
    t = summary.get("ttt")
    if not t:
        return []
    c, v = t["config"], t["verdict_detail"]
    lines = [
        "## Test-time training",
        "",
        f"Pathway `ttt`: the draft with LoRA adapters (rank {c['rank']}, modules {', '.join(c['target_modules'])}) "
        "trained "
        f"{c['steps']} steps at lr {c['lr']:g} ({c['anchors_per_step']} random anchors per step) on each task's prompt "
        "(system and user turns), reset before the next task; columns `draft` are the base draft. Controls run the "
        "base draft.",
        "",
        f"Context loss (the draft training loss on the prompt): {t['mean_context_loss_before']:.3f} before, "
        f"{t['mean_context_loss_after']:.3f} after (mean over {t['n_tasks']} tasks); TTT {t['mean_ttt_seconds']:.2f} s "
        "per task.",
        "",
        f"Verdict of the adapted draft, by the rule above with the base draft's null controls as its gate (the adapted "
        f"draft itself is not run under controls, so this gate is weaker than a readout's own): **{t['verdict']}** "
        f"({v['because']}).",
        "",
        "| mode | mean per-task log p_ttt - log p_draft | 95% CI | tasks |",
        "|---|---|---|---|",
    ]
    for mode, g in t["gain_over_base"].items():
        lines.append(
            f"| {mode} | {g['mean_per_task_logp_gain']:.3f} | [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] | "
            f"{g['n_tasks']} |"
        )
    return lines + [""]
