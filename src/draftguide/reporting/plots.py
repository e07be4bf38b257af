"""Every figure the package draws, apart from the arithmetic that makes the numbers (tuned-lens style).

Figures take the summaries the experiments write (plain dicts, as in `summary.json`) and a path; they use
matplotlib's Agg backend, so they work without a display. `pyplot()` and `save_figure()` are the two
primitives every figure goes through."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#c7c7c7"]


def colour(name: str, names: list[str]) -> str:
    """target blue; readouts, `ttt` and controls from one palette, in the order the run lists them."""
    return "#4c72b0" if name == "target" else PALETTE[names.index(name) % len(PALETTE)] if name in names else "#333333"


# -- figures ------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path, caption: str) -> dict:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"caption": caption}


def slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def stat_err(stat: dict, key: str) -> tuple[float, list[float]]:
    v = stat[key]
    lo, hi = stat["ci95"]
    return v, [max(v - lo, 0.0), max(hi - v, 0.0)]


def diagnostic_figures(records: list[dict], summary: dict, out_dir: Path, modes: list[str]) -> dict[str, dict]:
    """PNG files, each with its caption: {file: {"title", "caption"}}."""
    from draftguide.experiments.diagnostic import BUCKETS

    plt = pyplot()
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
        fname = "heatmap.png" if name == summary["readouts"][0] else f"heatmap_{slug(name)}.png"
        figs[fname] = save_figure(
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
                vals = [stat_err(g[f"offset:{k}"][key][n], stat) for k in ks]
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
        figs["rank_by_offset.png"] = save_figure(
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
                    vals = [stat_err(g[f"{k}|{pos}"]["logp_minus_target"][n], "mean") for k in here]
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
            figs[name] = save_figure(
                plt,
                fig,
                out_dir / name,
                f"{mode} mode: mean (log p - log p_target) by "
                f"{'target-confidence bucket' if kind == 'bucket' else kind}, "
                "first answer tokens (left) and later ones (right); readouts and their null controls side by side; "
                f"bars: 95% CI over tasks. Command: `{cmd}`.",
            )
    return figs


TTT_PANELS = (
    ("context_loss", "context loss (draft training loss on the prompt)"),
    ("logp_gap", "mean log p_draft - log p_target (answer tokens)"),
    ("tau", "tau (teacher-forced acceptance length)"),
)


def ttt_sweep_figure(summary: dict, path: Path) -> str:
    """Three panels against TTT steps, one line per (lr, rank); the best config starred. Returns the caption."""

    plt = pyplot()
    table, best = summary["table"], summary["best"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for lr, rank in sorted({(r["lr"], r["rank"]) for r in table}):
        rs = sorted((r for r in table if r["lr"] == lr and r["rank"] == rank), key=lambda r: r["steps"])
        for ax, (key, _) in zip(axes, TTT_PANELS):
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], marker="o", label=f"lr {lr:g}, rank {rank}")
    for ax, (key, label) in zip(axes, TTT_PANELS):
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


def fidelity_figure(summary: dict, path: str | Path) -> None:
    """Agreement and KL per offset, each readout beside its null."""

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in summary["readouts"].items():
        for ax, m in zip(axes, ("top1_agreement", "kl")):
            (line,) = ax.plot(r["k"], r[m], marker="o", label=name)
            for c, v in r.get("controls", {}).items():
                ax.plot(v["k"], v[m], marker="x", ls="--", color=line.get_color(), label=f"{name} (null: {c})")
    axes[0].set(xlabel="block offset k", ylabel="top-1 agreement with the target", ylim=(0, 1))
    axes[1].set(xlabel="block offset k", ylabel="KL(target || readout), nats")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_figure(s: dict, path: str | Path) -> None:
    """Probe accuracy per representation with its shuffled-label control (`draftguide probe`)."""
    from draftguide.experiments.probe import order

    plt = pyplot()
    names = order(s["representations"])
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.8))
    x = np.arange(len(names))
    for i, (key, label, colour) in enumerate(
        (
            ("probe", "probe (CV)", "#4c72b0"),
            ("shuffled", "shuffled labels", "#c7c7c7"),
            ("zero_shot", "zero-shot logit diff", "#dd8452"),
        )
    ):
        vals, err = [], [[], []]
        for n in names:
            r = s["representations"][n]
            r = r if key == "probe" else r.get(key, {"accuracy": np.nan, "ci95": [np.nan, np.nan]})
            vals.append(r["accuracy"])
            err[0].append(max(r["accuracy"] - r["ci95"][0], 0))
            err[1].append(max(r["ci95"][1] - r["accuracy"], 0))
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, yerr=err, capsize=2, label=label, color=colour)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="accuracy: reference vs distractor")
    ax.legend(fontsize=7)
    ax.set_title(f"linear probes at the answer position ({s['n_tasks']} tasks; bars 95% CI over contexts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beta_sweep_figure(summary: dict, path: Path) -> str:

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for curve, pts in summary["curves"].items():
        if not pts:
            continue
        x = [p["beta"] for p in pts]
        ax.plot(
            x,
            [p["solve_rate"] for p in pts],
            "o-",
            color=SWEEP_COLOURS[curve],
            label={"guided": "guided (draft)", "noise": "noise control"}.get(curve, "shuffled-readout control"),
        )
        ax.fill_between(
            x, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color=SWEEP_COLOURS[curve], alpha=0.15
        )
    for name, g in summary["baselines"].items():
        ax.axhline(g["solve_rate"], color=SWEEP_COLOURS[name], ls="--", lw=1, label=f"{name} {g['solve_rate']:.3f}")
    ax.set_xlabel("beta (weight of the draft / noise logits)")
    ax.set_ylabel("solve rate (95% CI)")
    ax.set_title(
        f"Draft-guided decoding, {summary['curves']['guided'][0]['n'] if summary['curves']['guided'] else 0} tasks"
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def ablation_figure(s: dict, logs: dict[str, list[dict]], path: Path) -> None:

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = s["rows"]
    for i, r in enumerate(rows):
        log = logs.get(r["set"], [])
        if log:
            axes[0].plot(
                [x["step"] for x in log], [x["loss"] for x in log], color=PALETTE[i % len(PALETTE)], label=r["set"]
            )
    axes[0].set(xlabel="step", ylabel="training loss", title="loss curves (same data, seed, budget)")
    axes[0].legend(fontsize=7)
    x = np.arange(len(rows))

    def bars(ax, vals, cis, offset, label, colour):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        err = np.array(
            [[max(a - c[0], 0), max(c[1] - a, 0)] if (c and a is not None) else [0, 0] for a, c in zip(vals, cis)]
        ).T
        ax.bar(x + offset, v, 0.38, yerr=err, capsize=2, label=label, color=colour)

    fid = [r.get("fidelity") or {} for r in rows]
    bars(axes[1], [f.get("top1_agreement_k1") for f in fid], [f.get("ci95") for f in fid], -0.19, "readout", "#4c72b0")
    bars(
        axes[1],
        [f.get("null_top1_agreement_k1") for f in fid],
        [f.get("null_ci95") for f in fid],
        0.19,
        "shuffled-feature null",
        "#c7c7c7",
    )
    axes[1].set(ylabel="top-1 agreement with the target, k = 1", ylim=(0, 1), title="fidelity")
    dg = [r.get("diagnostic") or {} for r in rows]
    bars(
        axes[2],
        [(d.get("all") or {}).get("mean") for d in dg],
        [(d.get("all") or {}).get("ci95") for d in dg],
        -0.19,
        "all tasks",
        "#55a868",
    )
    bars(
        axes[2],
        [(d.get("failed") or {}).get("mean") for d in dg],
        [(d.get("failed") or {}).get("ci95") for d in dg],
        0.19,
        "failed tasks",
        "#c44e52",
    )
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set(ylabel="mean per-task log p_readout - log p_target", title="diagnostic (next mode)")
    for ax in axes[1:]:
        ax.set_xticks(x)
        ax.set_xticklabels([r["set"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_figure(s: dict, path: Path) -> dict:
    """Cost of each stage per context length (`draftguide profile`)."""
    from draftguide.experiments.profiling import cost_rows

    plt = pyplot()
    # the cost bars go left: their long labels then take the figure margin, not a gap between panels
    fig, (costs, pre, band) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.1, 1, 0.6]})
    axes = [pre, costs, band]
    p = s["prefill"]
    x = [r["context_len"] for r in p]
    axes[0].errorbar(
        x,
        [r["median_s"] for r in p],
        yerr=[[r["median_s"] - r["min_s"] for r in p], [r["max_s"] - r["median_s"] for r in p]],
        marker="o",
        capsize=3,
        label="prefill (s)",
    )
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("context length (tokens)")
    axes[0].set_ylabel("target prefill, seconds (solid)")
    ax2 = axes[0].twinx()
    ax2.plot(x, [r["features_bytes"] / 2**20 for r in p], "s--", color="#dd8452", label="draft features (MiB)")
    ax2.set_yscale("log")
    ax2.set_ylabel("selected hidden states, MiB (dashed)")
    axes[0].set_title("prefill time and feature memory")
    rows = cost_rows(s)
    axes[1].barh([r[0] for r in rows][::-1], [1e3 * r[1] for r in rows][::-1], color="#4c72b0")
    axes[1].set_xlabel("milliseconds (median)")
    axes[1].set_title("per-operation cost")
    axes[1].tick_params(axis="y", labelsize=7)
    m = s["memory_bandwidth"]
    bw = [s["decode"]["achieved_bandwidth_GBps"], m["read_GBps"], m["copy_GBps"]]
    axes[2].bar(["decode\n(weights)", "sum\n(read)", "copy\n(read+write)"], bw, color=["#4c72b0", "#8c8c8c", "#c7c7c7"])
    axes[2].set_ylabel("GB/s")
    axes[2].set_title(f"bandwidth: decode at {100 * s['bandwidth_fraction']:.0f}%")
    return save_figure(
        plt,
        fig,
        path,
        f"left: median cost per operation; middle: target prefill time (median, bars min-max over n = "
        f"{s['repeats']}) and memory of the {len(s['target_layer_ids'])} selected hidden states vs context length; "
        f"right: achieved decode bandwidth vs the best of {m['n']} large-tensor reads and copies ({s['device']}, "
        f"{s['threads']} threads, {s['dtype']}).",
    )


MAX_HEATMAP_TOKENS = 40


# -- figure and report ------------------------------------------------------------------------------------
SWEEP_COLOURS = {
    "guided": "#dd8452",
    "noise": "#8c8c8c",
    "shuffle": "#da8bc3",
    "greedy": "#4c72b0",
    "power": "#55a868",
    "dola": "#8172b3",
    "sample": "#937860",
}


def training_curves_figure(runs: dict[str, dict], path: str | Path, smooth: int = 5) -> None:
    """Teacher agreement (k = 1, not-yet-seen training batches) against labels seen and against wall time, one
    line per run (running mean over `smooth` log rows), and each run's held-out agreement per offset when
    measured. `runs`: name -> {"log": train log rows, "heldout": fidelity readout summary or None}."""

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, r) in enumerate(runs.items()):
        c = PALETTE[i % len(PALETTE)]
        rows = [x for x in r["log"] if x.get("agree")]
        k1 = np.array([x["agree"][0] for x in rows], dtype=float)
        w = max(1, min(smooth, len(k1)))
        mean = np.convolve(k1, np.ones(w) / w, mode="valid") if len(k1) else k1
        for ax, key, scale in ((axes[0], "labels_seen", 1e3), (axes[1], "elapsed_s", 60.0)):
            x = np.array([row[key] for row in rows], dtype=float)[w - 1 :] / scale
            ax.plot(x, mean, color=c, label=name)
        h = r.get("heldout")
        if h:
            axes[2].plot(h["k"], h["top1_agreement"], marker="o", color=c, label=name)
            for v in h.get("controls", {}).values():
                axes[2].plot(v["k"], v["top1_agreement"], marker="x", ls="--", color=c, alpha=0.6)
    axes[0].set(xlabel="labels seen (thousands)", ylabel=f"k=1 agreement, training batches (mean of {smooth})")
    axes[1].set(xlabel="wall time (minutes)", ylabel="k=1 agreement, training batches")
    axes[2].set(xlabel="block offset k", ylabel="held-out top-1 agreement (x: shuffled-feature null)", ylim=(0, None))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
