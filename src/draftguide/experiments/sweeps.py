"""`draftguide sweep beta`: solve rate versus beta for draft-guided decoding, the noise control on the same
axes, and greedy / Power Sampling / DoLa as reference lines; plus where guidance flipped tokens.

Each point is one resumable `run_eval` folder under the sweep's folder (`guided_b0.3`, `noise_b0.3`,
`greedy`, ...), so an interrupted sweep picks up where it stopped. beta=0 is the target's greedy decoding
for guided and noise alike (exactly, by construction), so it is run once and used for both curves and
for the greedy reference line.
The numbers are computed first (`summarize_sweep`); the figure and report.md only read them.
"""

from __future__ import annotations

from pathlib import Path

from draftguide.errors import DraftGuideError
from draftguide.experiments.evaluate import RESULTS, run_eval, solve_rate_stats

BASELINES = ("greedy", "power", "dola", "sample")
DEFAULT_BASELINES = ("greedy", "power", "dola")
MAX_EXAMPLES = 30


def parse_betas(text: str) -> list[float]:
    try:
        betas = sorted({float(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise DraftGuideError(f"--betas {text!r}: expected a comma list of numbers in [0, 1]") from None
    if not betas or any(not 0 <= b <= 1 for b in betas):
        raise DraftGuideError(f"--betas {text!r}: expected a comma list of numbers in [0, 1]")
    return betas


def sweep_runs(
    betas: list[float], baselines=DEFAULT_BASELINES, noise: bool = True, shuffle: bool = False
) -> list[tuple[str, str, dict]]:
    """(folder name, method, options) of every run in the sweep; guided options are added by the caller.
    `shuffle`: also the shuffled-readout null (`guided-shuffle`: guidance from another task's readout)."""
    runs = []
    for b in betas:
        runs.append((f"guided_b{b:g}", "guided", {"beta": b}))
        if noise and b > 0:
            runs.append((f"noise_b{b:g}", "guided-noise", {"beta": b}))
        if shuffle and b > 0:
            runs.append((f"shuffle_b{b:g}", "guided-shuffle", {"beta": b}))
    for name in baselines:
        if name not in BASELINES:
            raise DraftGuideError(f"unknown baseline {name!r} (expected some of {', '.join(BASELINES)})")
        if not (name == "greedy" and 0 in betas):  # guided at beta 0 *is* greedy: no second run
            runs.append((name, name, {}))
    return runs


def run_beta_sweep(
    target,
    tokenizer,
    tasks: list[dict],
    out_dir,
    *,
    betas: list[float],
    draft: str,
    max_new_tokens: int = 48,
    baselines=DEFAULT_BASELINES,
    noise: bool = True,
    guided_options: dict | None = None,
    baseline_options: dict[str, dict] | None = None,
    settings: dict | None = None,
    progress: bool = True,
    batch_size: int = 1,
    shuffle: bool = False,
) -> dict:
    """Run every point (resuming), then write summary.json, flips.jsonl, beta_sweep.png and report.md.
    `batch_size`: tasks decoded together in each point's eval (`run_eval`; power, dola and the shuffled-readout
    null run row by row)."""
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    runs = sweep_runs(betas, baselines, noise, shuffle)
    results = {}
    for i, (name, method, opts) in enumerate(runs, 1):
        if method.startswith("guided"):
            opts = {"draft": draft, **(guided_options or {}), **opts}
            if method in ("guided-noise", "guided-shuffle"):
                opts.pop("ttt", None)  # the nulls read no prediction of this task's readout: nothing to adapt
        else:
            opts = {**(baseline_options or {}).get(method, {}), **opts}
        if progress:
            print(f"[{i}/{len(runs)}] {name}", flush=True)
        run_eval(
            target,
            tokenizer,
            tasks,
            out_dir / name,
            method=method,
            max_new_tokens=max_new_tokens,
            judge="rules",
            method_options=opts,
            settings=settings,
            progress=progress,
            batch_size=batch_size,
        )
        results[name] = ok_rows(out_dir / name / RESULTS)
    if "greedy" in baselines and 0 in betas:
        results["greedy"] = results["guided_b0"]
    summary = summarize_sweep(results, betas, noise, shuffle) | {
        "max_new_tokens": max_new_tokens,
        "draft": draft,
        "guided_options": guided_options or {},
        "baseline_options": baseline_options or {},
        "settings": settings or {},
        "environment": environment(),
    }
    with JsonlWriter(out_dir / "flips.jsonl", mode="w") as w:
        for name, rows in results.items():
            for r in rows:
                for f in r.get("flips", []):
                    w.write({"run": name, "task_id": r["task_id"], "score": r["score"]} | f)
    from draftguide.reporting.plots import beta_sweep_figure

    summary["figure"] = beta_sweep_figure(summary, out_dir / "beta_sweep.png")
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.md").write_text(beta_sweep_markdown(summary))
    return summary


def ok_rows(path: Path) -> list[dict]:
    """The rows of an eval `results.jsonl` whose task ran (status ok)."""
    from draftguide.modeling.prompts import read_jsonl

    return [r for r in read_jsonl(path) if r.get("status") == "ok"]


# -- numbers ----------------------------------------------------------------------------------------------
def _rate(rows: list[dict]) -> dict:
    return solve_rate_stats([int(r["score"]) for r in rows])


def flip_stats(rows: list[dict]) -> dict:
    """Flips per new token, and how often the flipped-to (guided) and flipped-from (target) tokens occur in
    the prompt, by id and by text."""
    flips = [f for r in rows for f in r.get("flips", [])]
    n_tok = sum(r.get("new_tokens", 0) for r in rows)
    frac = lambda key: sum(f[key] for f in flips) / len(flips) if flips else float("nan")  # noqa: E731
    return {
        "n_flips": len(flips),
        "new_tokens": n_tok,
        "flips_per_token": len(flips) / n_tok if n_tok else float("nan"),
        "guided_in_context": frac("guided_in_context"),
        "target_in_context": frac("target_in_context"),
        "guided_id_in_context": frac("guided_id_in_context"),
        "target_id_in_context": frac("target_id_in_context"),
    }


def _versus(rows: list[dict], ref: dict[str, int]) -> dict:
    """Tasks gained and lost against greedy decoding (the beta=0 run)."""
    both = [(int(r["score"]), ref[r["task_id"]]) for r in rows if r["task_id"] in ref]
    return {"gained": sum(s > g for s, g in both), "lost": sum(s < g for s, g in both)}


def summarize_sweep(
    results: dict[str, list[dict]], betas: list[float], noise: bool = True, shuffle: bool = False
) -> dict:
    """Per beta: guided and noise solve rates with 95% CIs, flip statistics, tasks gained/lost vs beta=0;
    baselines as reference lines; example flips from the best beta."""
    ref_name = f"guided_b{betas[0]:g}" if betas[0] == 0 else ("greedy" if "greedy" in results else None)
    ref = {r["task_id"]: int(r["score"]) for r in results.get(ref_name, [])} if ref_name else {}
    curves: dict[str, list[dict]] = {"guided": [], "noise": []} | ({"shuffle": []} if shuffle else {})
    for b in betas:
        for curve, prefix in (("guided", "guided"), ("noise", "noise"), ("shuffle", "shuffle")):
            if (curve == "noise" and not noise) or (curve == "shuffle" and not shuffle):
                continue
            name = f"{prefix}_b{b:g}" if b > 0 or curve == "guided" else f"guided_b{b:g}"
            rows = results[name]
            point = {"beta": b, "run": name} | _rate(rows) | {"flips": flip_stats(rows)}
            point["mean_effective_beta"] = (
                (sum(r.get("mean_beta", b) for r in rows) / len(rows)) if rows else float("nan")
            )
            if ref:
                point["vs_greedy"] = _versus(rows, ref)
            curves[curve].append(point)
    baselines = {}
    for name in BASELINES:
        if name in results:
            rows = results[name]
            baselines[name] = _rate(rows)
            if name == "power" and rows:
                baselines[name]["tokens_per_output_token"] = sum(r["tokens_per_output_token"] for r in rows) / len(rows)
    guided = [p for p in curves["guided"] if p["beta"] > 0]
    best = max(guided, key=lambda p: p["solve_rate"]) if guided else None
    examples = []
    if best is not None:
        rows = results[best["run"]]
        order = sorted(rows, key=lambda r: -(int(r["score"]) - ref.get(r["task_id"], 0)))  # gained tasks first
        examples = [
            {"task_id": r["task_id"], "score": r["score"], "greedy_score": ref.get(r["task_id"])} | f
            for r in order
            for f in r.get("flips", [])
        ][:MAX_EXAMPLES]
    return {
        "betas": betas,
        "curves": curves,
        "baselines": baselines,
        "reference_run": ref_name,
        "best_beta": best["beta"] if best else None,
        "flip_examples": examples,
    }


def beta_sweep_markdown(summary: dict) -> str:
    def rate(p):
        return f"{p['solve_rate']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"

    noise = {p["beta"]: p for p in summary["curves"].get("noise", [])}
    out = [
        "# Beta sweep: draft-guided decoding",
        "",
        f"![solve rate vs beta]({summary.get('figure', 'beta_sweep.png')})",
        "",
        "| beta | guided | noise control | shuffled-readout control | gained / lost vs greedy | flips / token | "
        "flipped-to token in context (text / id) | flipped-from token in context (text / id) | noise flips in context "
        "(text) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    shuffled = {p["beta"]: p for p in summary["curves"].get("shuffle", [])}
    for p in summary["curves"]["guided"]:
        n, f = noise.get(p["beta"]), p["flips"]
        sh = shuffled.get(p["beta"]) if p["beta"] > 0 else None
        vs = p.get("vs_greedy", {})
        nf = n["flips"] if n else None
        out.append(
            f"| {p['beta']:g} | {rate(p)} | {rate(n) if n else '-'} | {rate(sh) if sh else '-'} | "
            f"{vs.get('gained', '-')} / {vs.get('lost', '-')} | "
            f"{f['flips_per_token']:.3f} | {f['guided_in_context']:.2f} / {f['guided_id_in_context']:.2f} | "
            f"{f['target_in_context']:.2f} / {f['target_id_in_context']:.2f} | "
            f"{nf['guided_in_context'] if nf else float('nan'):.2f} |"
        )
    out += ["", "| baseline | solve rate | note |", "| --- | --- | --- |"]
    for name, g in summary["baselines"].items():
        note = (
            f"{g['tokens_per_output_token']:.1f} tokens generated per output token"
            if "tokens_per_output_token" in g
            else ""
        )
        out.append(f"| {name} | {rate(g)} | {note} |")
    if summary["flip_examples"]:
        out += [
            "",
            f"## Where guidance flipped a token (beta = {summary['best_beta']:g}, tasks gained over greedy first)",
            "",
            "| task | solved (greedy) | offset | target token | guided token | guided in context | target in context |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in summary["flip_examples"]:
            t, g = (repr(e[k]).replace("|", "\\|") for k in ("target_text", "guided_text"))
            out.append(
                f"| {e['task_id']} | {e['score']} ({e['greedy_score']}) | {e['i']} | `{t}` | `{g}` | "
                f"{e['guided_in_context']} | {e['target_in_context']} |"
            )
    out += [
        "",
        "In context: the token's text (stripped) occurs in the decoded prompt (as in the diagnostic); id: the "
        "token id occurs among the prompt's ids. Noise flips give the chance level of these rates.",
        "",
    ]
    return "\n".join(out)
