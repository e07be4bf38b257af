"""`draftguide report RUN_DIR... --out DIR`: one paper-style markdown over many run folders.

Each folder's kind is read from its files (summary.json fields; a `kind` field where a run writes one),
and each kind becomes a section with its tables and figures, every one captioned with n, the 95% CI and
the command that produced the run (`summary["command"]` or the folder's `command.txt`). Runs that already
write their own `report.md` (diagnose, profile, and any later kind that does) are embedded as they are,
figures copied next to the report; speculate, bench-tau and eval runs get tables and figures drawn here.
Folders of no known kind are skipped with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from draftguide.errors import DraftGuideError
from draftguide.reporting.runs import fmt, read_command

TITLES = {
    "diagnose": "Readout diagnostic",
    "profile": "Compute profile",
    "speculate": "Speculative decoding",
    "bench-tau": "Acceptance length per benchmark set",
    "eval": "Context-learning evaluation",
    "sweep-beta": "Draft-guided decoding: solve rate vs beta",
    "ttt-tau": "Acceptance length before and after TTT",
    "sweep-ttt": "TTT sweep: steps, learning rate, rank",
    "matrix": "The decision matrix: guidance vs greedy, nulls and baselines",
}


@dataclass
class Run:
    path: Path
    kind: str
    summary: dict
    command: str
    slug: str = ""


def detect_kind(summary: dict, folder: Path) -> str | None:
    """The run kind from what the folder holds; None when unknown."""
    if isinstance(summary.get("kind"), str):
        return summary["kind"]
    if "verdict_detail" in summary and "modes" in summary:
        return "diagnose"
    if "acceptance_histogram" in summary and "tau" in summary:
        return "speculate"
    if "delta_tau_mean" in (summary.get("all") or {}):
        return "ttt-tau"
    if isinstance(summary.get("sets"), dict):
        return "bench-tau"
    if "grid" in summary and "best" in summary:
        return "sweep-ttt"
    if isinstance(summary.get("curves"), dict) and "baselines" in summary:
        return "sweep-beta"
    if "solve_rate" in summary and "categories" in summary:
        return "eval"
    if (folder / "report.md").is_file():
        return "run"  # a kind this module does not know, with a report of its own
    return None


def load_runs(dirs: list[str | Path], skip: Path | None = None, warn: Callable[[str], None] | None = None) -> list[Run]:
    warn = warn or (lambda m: print(f"draftguide: warning: {m}", file=sys.stderr))
    runs, slugs = [], set()
    for d in map(Path, dirs):
        if skip is not None and d.resolve() == skip.resolve():
            continue  # `report runs/demo/* --out runs/demo/report` meets its own output folder
        if not d.is_dir():
            warn(f"'{d}' is not a folder: skipped")
            continue
        try:
            summary = json.loads((d / "summary.json").read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            summary = {}
        except json.JSONDecodeError as e:
            warn(f"'{d}/summary.json' is not valid JSON ({e.msg}): skipped")
            continue
        kind = detect_kind(summary, d)
        if kind is None:
            warn(f"'{d}' is no run folder of a known kind (no summary.json or report.md to read): skipped")
            continue
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", d.name) or "run"
        while slug in slugs:
            slug += "-x"
        slugs.add(slug)
        runs.append(Run(d, kind, summary, read_command(d, summary), slug))
    return runs


# -- sections -------------------------------------------------------------------------------------
def _ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{fmt(lo)}, {fmt(hi)}]"


def embedded(run: Run, fig_dir: Path) -> list[str]:
    """The run's own report.md, headings one level down, figures copied and relinked."""
    text = (run.path / "report.md").read_text()
    fig_dir.mkdir(parents=True, exist_ok=True)

    def relink(m: re.Match) -> str:
        src = run.path / m.group(2)
        if src.is_file():
            shutil.copy2(src, fig_dir / src.name)
            return f"![{m.group(1)}]({fig_dir.parent.name}/{fig_dir.name}/{src.name})"
        return m.group(0)

    out = []
    for line in text.splitlines():
        if line.startswith("# ") or line == f"Command: `{run.command}`":
            continue  # the section heading and its command line replace the run's own
        if line.startswith("##"):
            line = "#" + line  # one level down, under the section
        out.append(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", relink, line))
    return out


def speculate_section(run: Run, fig_dir: Path, count: Counter) -> list[str]:
    s = run.summary
    t = count.table()
    lines = [
        "| prompts | new tokens | block | verify | tau [95% CI] | tok/s | baseline tok/s | speedup | lossless |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['n_prompts']} | {s['new_tokens']} | {s['block_size']} | {s['verify_len']} | {fmt(s['tau'])} "
        f"{_ci(s['tau_ci95_over_prompts'])} | {fmt(s['tokens_per_s'], '.1f')} | {_num(s.get('baseline_tokens_per_s'))} "
        f"({s.get('baseline_method', '-')}) | {_num(s.get('speedup'), 2)} | {s.get('lossless', '-')} |",
        "",
        f"*Table {t}*: speculative decoding, n = {s['n_prompts']} prompts, T = {s['temperature']}; tau = tokens "
        "committed "
        "per target forward, 95% bootstrap CI over prompts; baseline = the faster plain decoding of the same target in "
        "the "
        f"same run{'; tau -: ' + s['tau_missing'] if s.get('tau_missing') else ''}. Command: `{run.command}`.",
        "",
    ]
    hist = s.get("acceptance_histogram") or []
    if hist:
        from draftguide.reporting.plots import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(1, len(hist) + 1), hist, color="#dd8452")
        ax.set_xlabel("tokens committed per verify step")
        ax.set_ylabel("steps")
        lines += _figure(
            plt,
            fig,
            fig_dir / "acceptance.png",
            count,
            f"acceptance lengths over all {sum(hist)} verify steps of n = {s['n_prompts']} prompts (tau "
            f"{fmt(s['tau'])}, 95% CI {_ci(s['tau_ci95_over_prompts'])}). Command: `{run.command}`.",
        )
    return lines


def bench_tau_section(run: Run, fig_dir: Path, count: Counter) -> list[str]:
    s = run.summary
    lines = [
        "| set | prompts | tau [95% CI] | tok/s | baseline tok/s | speedup | lossless |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in s["sets"].items():
        lines.append(
            f"| {name} | {v['n_prompts']} | {fmt(v['tau'])} {_ci(v['tau_ci95_over_prompts'])} | "
            f"{fmt(v['tokens_per_s'], '.1f')} | "
            f"{_num(v.get('baseline_tokens_per_s'))} | {_num(v.get('speedup'), 2)} | {v.get('lossless')} |"
        )
    lines += [
        "",
        f"*Table {count.table()}*: tau and speedup per held-out set, {s.get('max_new_tokens')} new tokens per prompt, "
        f"n prompts per row, 95% bootstrap CI over prompts. Command: `{run.command}`.",
        "",
    ]
    return lines


def ttt_tau_section(run: Run, fig_dir: Path, count: Counter) -> list[str]:
    from draftguide.reporting.plots import pyplot

    s = run.summary
    rows = [*s["sets"].items(), ("all", s["all"])]
    lines = [
        "| set | contexts | context tokens | tau base | tau TTT | delta tau [95% CI] | context loss before -> after | "
        "TTT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {v['n_contexts']} | {fmt(v['mean_context_tokens'], '.0f')} | {fmt(v['tau_base'], '.3f')} | "
        f"{fmt(v['tau_ttt'], '.3f')} | {fmt(v['delta_tau_mean'], '+.3f')} {_ci(v['delta_tau_ci95'])} | "
        f"{fmt(v['mean_context_loss_before'], '.3f')} -> {fmt(v['mean_context_loss_after'], '.3f')} | "
        f"{fmt(v['mean_ttt_s'], '.2f')} |"
        for name, v in rows
    ]
    t = s.get("ttt", {})
    lines += [
        "",
        f"*Table {count.table()}*: acceptance length of greedy speculative decoding before and after TTT "
        f"({t.get('steps')} steps, lr {t.get('lr')}, rank {t.get('rank')}) on the same context, n contexts per row, "
        f"{s.get('max_new_tokens')} new tokens; delta tau = mean per-context difference, 95% bootstrap CI over "
        "contexts. "
        f"Command: `{run.command}`.",
        "",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5))
    means = [v["delta_tau_mean"] for _, v in rows]
    err = [
        [max(m - v["delta_tau_ci95"][0], 0) for m, (_, v) in zip(means, rows)],
        [max(v["delta_tau_ci95"][1] - m, 0) for m, (_, v) in zip(means, rows)],
    ]
    ax.bar(range(len(rows)), means, yerr=err, capsize=3, color="#dd8452")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{name}\n(n={v['n_contexts']})" for name, v in rows], fontsize=8)
    ax.set_ylabel("delta tau (TTT - base)")
    lines += _figure(
        plt,
        fig,
        fig_dir / "delta_tau.png",
        count,
        f"mean per-context change of tau by TTT, bars 95% bootstrap CI over contexts, n per bar below it. "
        f"Command: `{run.command}`.",
    )
    return lines


def eval_section(run: Run, fig_dir: Path, count: Counter) -> list[str]:
    from draftguide.reporting.plots import pyplot
    from draftguide.reporting.runs import fmt_ci

    s = run.summary
    st = s.get("settings", {})
    lines = ["| category / subcategory | n | solve rate [95% CI] |", "|---|---|---|"]
    for c, g in s["categories"].items():
        lines.append(f"| **{c}** | {g['n']} | {fmt_ci(g, 'solve_rate')} |")
        lines += [
            f"| &nbsp;&nbsp;{k} | {sg['n']} | {fmt_ci(sg, 'solve_rate')} |" for k, sg in g["subcategories"].items()
        ]
    lines.append(f"| **overall** | {s['n']} | {fmt_ci(s, 'solve_rate')} |")
    extra = ", ".join(
        f"{s[k]} {k[2:].replace('_', ' ')}" for k in ("n_errors", "n_pending", "n_judge_failures") if s.get(k)
    )
    lines += [
        "",
        f"*Table {count.table()}*: solve rate of method `{st.get('method', '?')}` ({st.get('max_new_tokens', '?')} new "
        f"tokens, judge {st.get('judge', '?')}) on n = {s['n']} finished tasks{' (' + extra + ')' if extra else ''}; "
        f"95% bootstrap CI over tasks. Command: `{run.command}`.",
        "",
    ]
    ec = s.get("error_classes")
    if ec and ec.get("n_failed"):
        from draftguide.experiments.taxonomy import CLASSES

        lines += [
            "| failure class | " + " | ".join(CLASSES) + " |",
            "|---|" + "---|" * len(CLASSES),
            "| failed tasks | "
            + " | ".join(f"{ec['counts'][k]} ({fmt(ec['shares'][k], '.2f')})" for k in CLASSES)
            + " |",
            "",
            f"*Table {count.table()}*: the {ec['n_failed']} failed responses by failure class "
            "(`draftguide.experiments.taxonomy`: "
            "prior = names the distractor where the prompt does not hold it; context_item = names another item of the "
            "prompt; no_answer = empty or a refusal; partial = the reference plus a forbidden item; other), count "
            "(share)"
            + (
                f"; {ec['n_unclassified']} rows written before the taxonomy unclassified"
                if ec.get("n_unclassified")
                else ""
            )
            + f". Command: `{run.command}`.",
            "",
        ]
    cats = list(s["categories"].items())
    if cats:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(cats)), 3.8))
        rates = [g["solve_rate"] for _, g in cats]
        err = [
            [max(r - g["ci95"][0], 0) for r, (_, g) in zip(rates, cats)],
            [max(g["ci95"][1] - r, 0) for r, (_, g) in zip(rates, cats)],
        ]
        ax.bar(range(len(cats)), rates, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([f"{c}\n(n={g['n']})" for c, g in cats], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("solve rate")
        lines += _figure(
            plt,
            fig,
            fig_dir / "solve_rate.png",
            count,
            f"solve rate by category, bars 95% bootstrap CI over tasks, n per bar below it (overall "
            f"{fmt(s['solve_rate'], '.3f')} on n = {s['n']}). Command: `{run.command}`.",
        )
    return lines


def _figure(plt, fig, path: Path, count: Counter, caption: str) -> list[str]:
    """Save a figure drawn here under `figures/<run>/` and return its markdown with a numbered caption."""
    from draftguide.reporting.plots import save_figure

    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(plt, fig, path, caption)
    return [
        f"![{path.stem}]({path.parent.parent.name}/{path.parent.name}/{path.name})",
        "",
        f"*Figure {count.figure()}*: {caption}",
        "",
    ]


def _num(x, digits: int = 1) -> str:
    return fmt(x, f".{digits}f")


class Counter:
    """Table and figure numbers across the whole report."""

    def __init__(self):
        self.t = self.f = 0

    def table(self) -> int:
        self.t += 1
        return self.t

    def figure(self) -> int:
        self.f += 1
        return self.f


SECTIONS = {
    "speculate": speculate_section,
    "bench-tau": bench_tau_section,
    "eval": eval_section,
    "ttt-tau": ttt_tau_section,
}


def write_report(dirs: list[str | Path], out_dir: str | Path, command: str = "", warn=None) -> Path:
    """Gather the runs in `dirs` into `out_dir/report.md` (figures under `out_dir/figures/`)."""
    out_dir = Path(out_dir)
    runs = load_runs(dirs, skip=out_dir, warn=warn)
    if not runs:
        raise DraftGuideError("no run folder of a known kind among the given paths")
    figs = out_dir / "figures"
    if figs.is_dir():
        shutil.rmtree(figs)  # figures of runs no longer in the report must not linger
    count = Counter()
    lines = [
        "# draftguide: experiment report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(runs)} run folders"
        + (f" by `{command}`" if command else "")
        + ". Every table and figure gives its n, its 95% CI (bootstrap; "
        "timings: median and range over repeats) and the command that produced it.",
        "",
        "## Runs",
        "",
        "| # | run | kind | command |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i} | `{r.path}` | {r.kind} | `{r.command}` |" for i, r in enumerate(runs, 1)]
    for i, r in enumerate(runs, 1):
        lines += [
            "",
            f"## {i}. {TITLES.get(r.kind, r.kind.capitalize())}: `{r.path}`",
            "",
            f"Command: `{r.command}`",
            "",
        ]
        if r.kind in SECTIONS:
            lines += SECTIONS[r.kind](r, figs / r.slug, count)
        else:
            lines += embedded(r, figs / r.slug)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["Run", "detect_kind", "load_runs", "write_report"]
