"""`report.md` of `draftguide diagnose`: tables, verdict lines and the TTT section, from `summary.json`."""

from __future__ import annotations

from draftguide.experiments.diagnostic import BUCKETS
from draftguide.reporting.runs import fmt_ci


def group_table(g: dict, keys: list[str], label: str) -> list[str]:
    """One row per (group, pathway): n, mean log p, median rank, difference from the target, rank win/tie."""
    head = [label, "pathway", "tokens", "tasks", "log p", "median rank", "Δlog p vs target", "rank win / tie vs target"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        s = g[k]
        for n in s["mean_logp"]:
            diff = fmt_ci(s["logp_minus_target"][n], "mean") if n != "target" else "-"
            win = (
                f"{fmt_ci(s['rank_vs_target'][n]['win'], 'mean')} / {s['rank_vs_target'][n]['tie']['mean']:.2f}"
                if n != "target"
                else "-"
            )
            cells = [
                k.split(":", 1)[-1] if ":" in k else k,
                n,
                str(s["n_tokens"]),
                str(s["n_tasks"]),
                fmt_ci(s["mean_logp"][n], "mean"),
                fmt_ci(s["median_rank"][n], "median", 1),
                diff,
                win,
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def stat_text(x: dict | None) -> str:
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
            f"{stat_text(g)} | {g['n_tasks']} | yes (gate) |"
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
            lines.append(f"| {label} | {stat_text(b[key])} | {n} | no |")
    for pos in ("first", "later"):
        if b.get(pos):
            p = b[pos]
            lines.append(
                f"| {pos} answer tokens ({p['n_tokens']}): log p_{name} - log p_target | {stat_text(p['vs_target'])} | "
                f"{p['vs_target']['n_tasks']} | no |"
            )
            for c, g in p["vs_controls"].items():
                lines.append(
                    f"| {pos} answer tokens: log p_{name} - log p_{c} | {stat_text(g)} | {g['n_tasks']} | no |"
                )
    return lines + [""]


def diagnostic_markdown(summary: dict, figures: dict[str, dict]) -> str:
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
                lines += [f"### {title} (n = {summary['n_tasks']} tasks)", "", *group_table(g, keys, label), ""]
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
