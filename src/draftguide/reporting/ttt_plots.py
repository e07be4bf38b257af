"""Figures and markdown of `draftguide sweep ttt` (matplotlib, Agg); the numbers come from `ttt_measure.py`."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("context_loss", "context loss (draft training loss on the prompt)"),
    ("logp_gap", "mean log p_draft - log p_target (answer tokens)"),
    ("tau", "tau (teacher-forced acceptance length)"),
)


def sweep_figure(summary: dict, path: Path) -> str:
    """Three panels against TTT steps, one line per (lr, rank); the best config starred. Returns the caption."""
    from draftguide.experiments.diagnose import _plt

    plt = _plt()
    table, best = summary["table"], summary["best"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for lr, rank in sorted({(r["lr"], r["rank"]) for r in table}):
        rs = sorted((r for r in table if r["lr"] == lr and r["rank"] == rank), key=lambda r: r["steps"])
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], marker="o", label=f"lr {lr:g}, rank {rank}")
    for ax, (key, label) in zip(axes, PANELS):
        ax.plot(
            [best["steps"]],
            [best[key]],
            marker="*",
            markersize=16,
            color="gold",
            markeredgecolor="black",
            zorder=5,
            label="best" if key == "tau" else None,
        )
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("TTT steps")
        ax.set_ylabel(label)
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"TTT sweep over {summary['n_tasks']} tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return (
        f"context loss, log-prob gap and tau against TTT steps per (lr, rank), {summary['n_tasks']} tasks; star: best "
        f"config ({summary['best_rule']})."
    )


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
