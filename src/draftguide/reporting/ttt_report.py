"""`sweep.md` of `draftguide sweep-ttt`: the table and the text beside its figure."""

from __future__ import annotations


def sweep_table(summary: dict) -> list[str]:
    best = summary["best"]
    lines = [
        "| lr | rank | steps | context loss | log p gap [95% CI] | tau | delta tau vs base [95% CI] | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["table"]:
        d = (
            ""
            if r["delta_tau"] is None
            else f"{r['delta_tau']:+.3f} [{r['delta_tau_ci95'][0]:+.3f}, {r['delta_tau_ci95'][1]:+.3f}]"
        )
        mark = "**best**" if all(r[k] == best[k] for k in ("lr", "rank", "steps")) else ""
        lines.append(
            f"| {r['lr']:g} | {r['rank']} | {r['steps']} | {r['context_loss']:.3f} | {r['logp_gap']:.3f} "
            f"[{r['logp_gap_ci95'][0]:.3f}, {r['logp_gap_ci95'][1]:.3f}] | {r['tau']:.3f} | {d} | {mark} |"
        )
    return lines


def sweep_markdown(summary: dict) -> str:
    b = summary["best"]
    return "\n".join(
        [
            "# TTT sweep: context loss, readout log-prob gap and tau versus steps, lr and rank",
            "",
            f"Command: `{summary.get('command') or '(library call)'}`",
            "",
            f"{summary['n_tasks']} tasks ({summary['n_skipped']} skipped without a reference answer). Context = each "
            "task's prompt "
            "(chat template over the system and user turns). Log-prob gap: mean per-task (log p_draft - log p_target) "
            "of the "
            "reference answer tokens, `next` mode. tau: "
            + summary["tau_method"]
            + f", {summary['max_new_tokens']} new tokens. "
            "Steps 0 = the base draft. CIs: bootstrap over tasks.",
            "",
            f"**Best config** ({summary['best_rule']}): lr {b['lr']:g}, rank {b['rank']}, {b['steps']} steps: tau "
            f"{b['tau']:.3f}, "
            f"log-prob gap {b['logp_gap']:.3f}, context loss {b['context_loss']:.3f}.",
            "",
            *sweep_table(summary),
            "",
            "![sweep.png](sweep.png)",
            "",
            f"*sweep.png*: {summary['figure']}",
            "",
        ]
    )
