"""`draftguide matrix`: the research plan's decision matrix, measured on one task set in one command.

It composes `sweep beta` runs (each point a resumable `run_eval` folder) into one folder:

    sweep_<readout0>/   greedy (= guided at beta 0), guided per beta, the noise null and the shuffled-readout
                        null per beta, and the baselines (temperature sampling, Power Sampling, DoLa)
    sweep_<readout>/    guided per beta with each further readout (plan item 2.2 for every readout)
    ttt_<readout>/      TTT on each task's context, then guided decoding, per beta (2.3)
    adaptive_<readout0>/  the divergence schedule beta_t = beta * JS(target, readout) / ln 2 (3.3)

then reads every run's per-task scores and writes summary.json, per_task.jsonl and report.md: solve rate
with 95% bootstrap CIs over tasks for every row, the paired per-task difference to greedy (95% CI) with the
tasks fixed / broken, the decision-matrix row that holds and the numbers that decide it, and 2.5: where
guidance changed the output and whether those are context words (the diagnostic v2 whole-word tags).

Decision rule (fixed before the numbers): a family (2.2: guided without TTT over readouts x betas; 2.3:
TTT + guided) *beats greedy* when its best configuration (largest mean paired difference) has a paired
difference to greedy whose bootstrap CI, Bonferroni-widened over the family's size, lies above 0, *and* its
paired difference to each null control at the same beta (noise, shuffled readout; 95% CI) lies above 0 (a
gain a null gives too is no guidance). 2.3 > 2.2 when the best TTT configuration beats its own no-TTT twin
(same readout and beta; paired 95% CI above 0). Rows: "2.3 > 2.2 > baseline" (both beat greedy and TTT beats
its twin), "2.2 > baseline" (2.2 beats greedy; TTT adds nothing measurable), "2.3 > baseline only", and "all
about baseline" (neither: a null result).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from draftguide.errors import DraftGuideError

NULLS = ("noise", "shuffle")
SHARPENING = ("sample", "power", "dola")
MAX_EXAMPLES = 24


@dataclass
class MatrixConfig:
    betas: list[float]  # > 0; beta 0 (greedy) is always run
    readouts: dict[str, str]  # label -> draft spec; the first is the default readout (nulls, adaptive)
    ttt: dict | None = None  # ttt_adapt options; None: no 2.3 rows
    ttt_readouts: list[str] = field(default_factory=list)  # labels TTT runs with (default: the first)
    nulls: tuple[str, ...] = NULLS
    baselines: tuple[str, ...] = SHARPENING
    adaptive: bool = True
    max_new_tokens: int = 48
    guided_options: dict = field(default_factory=dict)  # mix, guard_top_k: every guided row
    baseline_options: dict = field(default_factory=dict)  # method -> options
    n_boot: int = 2000
    seed: int = 0

    def validate(self) -> "MatrixConfig":
        if not self.betas or any(not 0 < b <= 1 for b in self.betas):
            raise DraftGuideError(f"matrix betas must be in (0, 1] (beta 0, greedy, is always run), got {self.betas}")
        if not self.readouts:
            raise DraftGuideError("the matrix needs at least one readout")
        bad = [n for n in self.nulls if n not in NULLS] + [b for b in self.baselines if b not in SHARPENING]
        if bad:
            raise DraftGuideError(
                f"unknown null(s)/baseline(s) {bad} (nulls: {', '.join(NULLS)}; baselines: {', '.join(SHARPENING)})"
            )
        if self.ttt is not None:
            self.ttt_readouts = self.ttt_readouts or [next(iter(self.readouts))]
            unknown = [r for r in self.ttt_readouts if r not in self.readouts]
            if unknown:
                raise DraftGuideError(f"TTT readout(s) {unknown} are not among the readouts {list(self.readouts)}")
        if self.max_new_tokens < 1 or self.n_boot < 100:
            raise DraftGuideError("max_new_tokens must be >= 1 and n_boot >= 100")
        return self


# -- the runs ---------------------------------------------------------------------------------------------
def plan(cfg: MatrixConfig) -> list[dict]:
    """Every row of the matrix: {row, group, readout, beta, folder (relative to the matrix folder)}."""
    first = next(iter(cfg.readouts))
    rows = [{"row": "greedy", "group": "baseline", "readout": None, "beta": 0.0, "folder": f"sweep_{first}/guided_b0"}]
    rows += [
        {"row": b, "group": "sharpening", "readout": None, "beta": None, "folder": f"sweep_{first}/{b}"}
        for b in cfg.baselines
    ]
    for label in cfg.readouts:
        rows += [
            {
                "row": f"guided {label} b{b:g}",
                "group": "2.2",
                "readout": label,
                "beta": b,
                "folder": f"sweep_{label}/guided_b{b:g}",
            }
            for b in cfg.betas
        ]
    if cfg.ttt is not None:
        for label in cfg.ttt_readouts:
            rows += [
                {
                    "row": f"ttt+guided {label} b{b:g}",
                    "group": "2.3",
                    "readout": label,
                    "beta": b,
                    "folder": f"ttt_{label}/guided_b{b:g}",
                }
                for b in cfg.betas
            ]
    for null in cfg.nulls:
        rows += [
            {
                "row": f"{null} null b{b:g}",
                "group": f"null-{null}",
                "readout": first,
                "beta": b,
                "folder": f"sweep_{first}/{null}_b{b:g}",
            }
            for b in cfg.betas
        ]
    if cfg.adaptive:
        rows += [
            {
                "row": f"adaptive {first} b{b:g}",
                "group": "adaptive",
                "readout": first,
                "beta": b,
                "folder": f"adaptive_{first}/guided_b{b:g}",
            }
            for b in cfg.betas
        ]
    return rows


def run_matrix(
    target,
    tokenizer,
    tasks: list[dict],
    out_dir,
    cfg: MatrixConfig,
    *,
    settings: dict | None = None,
    command: str = "",
    progress: bool = True,
    batch_size: int = 1,
) -> dict:
    """Run every sweep (resuming), then analyse and write summary.json, per_task.jsonl and report.md.
    `batch_size`: tasks decoded together in every sweep point that supports it (`run_beta_sweep`); the answers
    equal batch 1's, so it is not a run setting (a folder resumes at another batch size) and only the summary's
    settings record it."""
    from draftguide.experiments.sweeps import run_beta_sweep

    cfg.validate()
    out_dir = Path(out_dir)
    first = next(iter(cfg.readouts))
    common = dict(max_new_tokens=cfg.max_new_tokens, settings=settings, progress=progress, batch_size=batch_size)
    sweeps = [
        (
            f"sweep_{first}",
            first,
            dict(
                betas=[0.0, *cfg.betas],
                noise="noise" in cfg.nulls,
                shuffle="shuffle" in cfg.nulls,
                baselines=["greedy", *cfg.baselines],
                baseline_options=cfg.baseline_options,
                guided_options=dict(cfg.guided_options),
            ),
        )
    ]
    sweeps += [
        (
            f"sweep_{label}",
            label,
            dict(betas=cfg.betas, noise=False, baselines=[], guided_options=dict(cfg.guided_options)),
        )
        for label in list(cfg.readouts)[1:]
    ]
    if cfg.ttt is not None:
        sweeps += [
            (
                f"ttt_{label}",
                label,
                dict(
                    betas=cfg.betas,
                    noise=False,
                    baselines=[],
                    guided_options=dict(cfg.guided_options) | {"ttt": cfg.ttt},
                ),
            )
            for label in cfg.ttt_readouts
        ]
    if cfg.adaptive:
        sweeps.append(
            (
                f"adaptive_{first}",
                first,
                dict(
                    betas=cfg.betas,
                    noise=False,
                    baselines=[],
                    guided_options=dict(cfg.guided_options) | {"beta_schedule": "adaptive"},
                ),
            )
        )
    for i, (folder, label, kw) in enumerate(sweeps, 1):
        if progress:
            print(f"== matrix [{i}/{len(sweeps)}] {folder}", flush=True)
        run_beta_sweep(target, tokenizer, tasks, out_dir / folder, draft=cfg.readouts[label], **common, **kw)
    return finish_matrix(tasks, out_dir, cfg, settings=(settings or {}) | {"batch_size": batch_size}, command=command)


def finish_matrix(
    tasks: list[dict], out_dir, cfg: MatrixConfig, *, settings: dict | None = None, command: str = ""
) -> dict:
    """Analyse the finished runs of a matrix folder and write its outputs."""
    from draftguide.experiments.sweeps import ok_rows
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    results = {}
    for r in plan(cfg):
        path = out_dir / r["folder"] / "results.jsonl"
        if not path.is_file():
            raise DraftGuideError(f"matrix row {r['row']!r}: no results in '{path.parent}'")
        results[r["row"]] = ok_rows(path)
    s = analyse(tasks, results, plan(cfg), cfg)
    s |= {
        "kind": "matrix",
        "command": command,
        "config": asdict(cfg),
        "settings": settings or {},
        "environment": environment(),
    }
    with JsonlWriter(out_dir / "per_task.jsonl", mode="w") as w:
        for row in s.pop("per_task"):
            w.write(row)
    write_json(out_dir / "summary.json", s)
    (out_dir / "report.md").write_text(matrix_markdown(s))
    return s


# -- the numbers ------------------------------------------------------------------------------------------
def paired(rows: list[dict], ref: dict[str, int], n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """The paired per-task difference (row - reference) over tasks both finished: mean, bootstrap CI at level
    1 - alpha, tasks fixed (0 -> 1) and broken (1 -> 0)."""
    from draftguide.reporting.runs import bootstrap_ci

    pairs = [(r["task_id"], int(r["score"]) - ref[r["task_id"]]) for r in rows if r["task_id"] in ref]
    d = [x for _, x in pairs]
    return {
        "n": len(d),
        "mean_diff": float(np.mean(d)) if d else float("nan"),
        "ci": list(bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)),
        "level": 1 - alpha,
        "fixed": [t for t, x in pairs if x > 0],
        "broken": [t for t, x in pairs if x < 0],
    }


def _scores(rows: list[dict]) -> dict[str, int]:
    return {r["task_id"]: int(r["score"]) for r in rows}


def _above(p: dict | None) -> bool:
    return p is not None and p["n"] > 0 and p["ci"][0] > 0


def starts_word(text: str, prefix: str | None) -> bool:
    """Whether a whole word of `text` begins with `prefix` (case-insensitive): the target side of a flip,
    whose word is known only up to the flipped token's end."""
    if not prefix or not isinstance(text, str):
        return False
    return re.search(r"(?<!\w)" + re.escape(prefix), text, re.IGNORECASE) is not None


def flip_tags(
    rows: list[dict], tasks_by_id: dict[str, dict], greedy_resp: dict[str, str], outcome: dict[str, int]
) -> dict:
    """2.5: where a row's decoding left the target's argmax, with the diagnostic's whole-word tags: the guided
    token's word in the task's context (`context_text`), in context but not in greedy's response (`missed`:
    guidance brought in a context word greedy did not use), and whether the target's word (so far) starts a
    context word. All flips, the first flip of each task (the only one on greedy's own path), and flips in
    tasks the row fixed / broke vs greedy (`outcome`: task -> +1 / -1 / 0)."""
    from draftguide.experiments.diagnostic import context_text, find_word

    def tag(r, f):
        ctx = context_text(tasks_by_id[r["task_id"]])
        word = f.get("guided_word")
        in_ctx = word is not None and find_word(ctx, word) is not None
        resp = greedy_resp.get(r["task_id"])
        missed = in_ctx and isinstance(resp, str) and find_word(resp, word) is None
        return {
            "word": word is not None,
            "ctx": in_ctx,
            "missed": missed,
            "target_ctx": starts_word(ctx, f.get("target_word")),
        }

    groups = {"all": [], "first": [], "fixed": [], "broken": []}
    n_tok = sum(r.get("new_tokens", 0) for r in rows)
    for r in rows:
        if r["task_id"] not in tasks_by_id:
            continue
        tags = [tag(r, f) for f in r.get("flips", []) if "guided_word" in f]
        groups["all"] += tags
        groups["first"] += tags[:1]
        o = outcome.get(r["task_id"], 0)
        if o:
            groups["fixed" if o > 0 else "broken"] += tags

    def share(ts, key):
        ts = [t for t in ts if t["word"]] if key != "word" else ts
        return sum(t[key] for t in ts) / len(ts) if ts else float("nan")

    return {
        "n_flips": len(groups["all"]),
        "new_tokens": n_tok,
        "flips_per_token": len(groups["all"]) / n_tok if n_tok else float("nan"),
        **{
            g: {
                "n": len(ts),
                "word_share": share(ts, "word"),
                "context_word": share(ts, "ctx"),
                "missed_context_word": share(ts, "missed"),
                "target_word_in_context": share(ts, "target_ctx"),
            }
            for g, ts in groups.items()
        },
    }


def analyse(tasks: list[dict], results: dict[str, list[dict]], rows: list[dict], cfg: MatrixConfig) -> dict:
    """Every row with n and 95% CI, paired differences to greedy, the decision and the flip tags."""
    from draftguide.experiments.diagnostic import context_text
    from draftguide.experiments.evaluate import solve_rate_stats

    by_id = {t["metadata"]["task_id"]: t for t in tasks}
    greedy_rows = results["greedy"]
    ref = _scores(greedy_rows)
    greedy_resp = {r["task_id"]: r.get("response") for r in greedy_rows}
    table = []
    for r in rows:
        rs = results[r["row"]]
        entry = dict(r) | solve_rate_stats([int(x["score"]) for x in rs])
        if r["row"] != "greedy":
            entry["vs_greedy"] = paired(rs, ref, cfg.n_boot, cfg.seed)
        if r["group"] not in ("baseline", "sharpening"):
            outcome = {t: 1 for t in entry["vs_greedy"]["fixed"]} | {t: -1 for t in entry["vs_greedy"]["broken"]}
            entry["flips"] = flip_tags(rs, by_id, greedy_resp, outcome)
            entry["mean_effective_beta"] = (
                float(np.mean([x.get("mean_beta", r["beta"]) for x in rs])) if rs else float("nan")
            )
        table.append(entry)
    by_row = {e["row"]: e for e in table}

    def best_of(group: str) -> dict | None:
        fam = [e for e in table if e["group"] == group and e["vs_greedy"]["n"]]
        if not fam:
            return None
        best = max(fam, key=lambda e: (e["vs_greedy"]["mean_diff"], -e["beta"]))
        adj = paired(results[best["row"]], ref, cfg.n_boot, cfg.seed, alpha=0.05 / len(fam))
        vs_nulls = {}
        for null in cfg.nulls:
            name = f"{null} null b{best['beta']:g}"
            if name in results:
                vs_nulls[null] = paired(results[best["row"]], _scores(results[name]), cfg.n_boot, cfg.seed)
        beats_greedy = _above(adj)
        above_nulls = all(_above(p) for p in vs_nulls.values())
        return {
            "row": best["row"],
            "readout": best["readout"],
            "beta": best["beta"],
            "family_size": len(fam),
            "vs_greedy": best["vs_greedy"],
            "vs_greedy_bonferroni": adj,
            "vs_nulls": vs_nulls,
            "beats_greedy": beats_greedy,
            "above_nulls": above_nulls,
            "holds": beats_greedy and above_nulls,
        }

    d22, d23 = best_of("2.2"), best_of("2.3")
    ttt_over = None
    if d23 is not None:
        twin = f"guided {d23['readout']} b{d23['beta']:g}"
        if twin in results:
            ttt_over = paired(results[d23["row"]], _scores(results[twin]), cfg.n_boot, cfg.seed) | {"twin": twin}
    g22, g23 = bool(d22 and d22["holds"]), bool(d23 and d23["holds"])
    if g22 and g23 and _above(ttt_over):
        row = "2.3 > 2.2 > baseline"
    elif g22:
        row = "2.2 > baseline"
    elif g23:
        row = "2.3 > baseline only"
    else:
        row = "all about baseline"
    sharp = [e for e in table if e["group"] == "sharpening" and e["vs_greedy"]["n"]]
    best_sharp = max(sharp, key=lambda e: e["vs_greedy"]["mean_diff"]) if sharp else None
    vs_sharp = None
    if best_sharp is not None and d22 is not None:
        vs_sharp = paired(results[d22["row"]], _scores(results[best_sharp["row"]]), cfg.n_boot, cfg.seed) | {
            "baseline": best_sharp["row"]
        }
    per_task = [
        {
            "task_id": tid,
            "context_category": t["metadata"].get("context_category"),
            "sub_category": t["metadata"].get("sub_category"),
            "scores": {
                name: next((int(x["score"]) for x in rs if x["task_id"] == tid), None) for name, rs in results.items()
            },
        }
        for tid, t in by_id.items()
    ]
    cats: dict[str, int] = {}
    for t in tasks:
        c = t["metadata"].get("context_category") or "(none)"
        cats[c] = cats.get(c, 0) + 1
    examples = []
    focus = d22 or d23
    if focus is not None:
        fixed, broken = set(focus["vs_greedy"]["fixed"]), set(focus["vs_greedy"]["broken"])
        for x in sorted(results[focus["row"]], key=lambda x: (x["task_id"] not in fixed, x["task_id"] not in broken)):
            ctx = context_text(by_id[x["task_id"]])
            for f in x.get("flips", [])[:3]:
                w = f.get("guided_word")
                examples.append(
                    {
                        "task_id": x["task_id"],
                        "outcome": "fixed" if x["task_id"] in fixed else "broken" if x["task_id"] in broken else "same",
                        "i": f["i"],
                        "target_text": f["target_text"],
                        "guided_text": f["guided_text"],
                        "guided_word": w,
                        "context_word": bool(w) and _find(ctx, w),
                    }
                )
        examples = examples[:MAX_EXAMPLES]
    return {
        "n_tasks": len(tasks),
        "categories": cats,
        "failure_classes": failure_classes(tasks, results, [d22, d23, best_sharp], cfg.nulls),
        "rows": table,
        "best_2_2": d22,
        "best_2_3": d23,
        "ttt_over_twin": ttt_over,
        "decision": row,
        "best_sharpening": best_sharp and best_sharp["row"],
        "best_2_2_vs_best_sharpening": vs_sharp,
        "flip_examples": examples,
        "per_task": per_task,
        "row_names": list(by_row),
    }


def failure_classes(
    tasks: list[dict], results: dict[str, list[dict]], best: list[dict | None], nulls: tuple[str, ...]
) -> dict[str, dict]:
    """3.1 per row that decides something (the best 2.2 and 2.3 configurations, the best sharpening baseline,
    and the nulls at the best 2.2's beta): the error-taxonomy flip table against greedy (`taxonomy.flip_table`:
    per failure class, the tasks fixed and the tasks newly failing in it)."""
    from draftguide.experiments.taxonomy import flip_table

    names = [b["row"] for b in best if b is not None]
    if best[0] is not None:
        names += [f"{n} null b{best[0]['beta']:g}" for n in nulls]
    return {n: flip_table(results["greedy"], results[n], tasks) for n in dict.fromkeys(names) if n in results}


def _find(text, word) -> bool:
    from draftguide.experiments.diagnostic import find_word

    return find_word(text, word) is not None


# -- the report -------------------------------------------------------------------------------------------
NEXT_STEPS = [
    (
        "activation-space intervention (steer the target's residual stream with the readout instead of mixing logits)",
        "not supported yet",
    ),
    (
        "top-k constrained guidance (guidance may only re-rank the target's top-k tokens)",
        "supported: `--guard-top-k K` (eval / sweep beta / matrix / generate; option `guard_top_k`)",
    ),
    (
        "per-token divergence gating (guide only where target and readout disagree)",
        "supported: `--beta-schedule adaptive` (beta_t = beta * JS / ln 2; the matrix's adaptive rows); a hard gate is "
        "not",
    ),
]


def _ci(c) -> str:
    return f"[{c[0]:+.3f}, {c[1]:+.3f}]" if c and not any(np.isnan(c)) else "-"


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"


def _decide_text(name: str, d: dict | None) -> str:
    if d is None:
        return f"- {name}: not run."
    v, a = d["vs_greedy"], d["vs_greedy_bonferroni"]
    nulls = (
        "; ".join(
            f"vs {k} null at beta {d['beta']:g}: {p['mean_diff']:+.3f} {_ci(p['ci'])}" for k, p in d["vs_nulls"].items()
        )
        or "no null run"
    )
    verdict = (
        "beats greedy and the nulls"
        if d["holds"]
        else "beats greedy but not the nulls (not counted)"
        if d["beats_greedy"]
        else "does not beat greedy"
    )
    return (
        f"- {name}: best configuration `{d['row']}` (of {d['family_size']}): paired difference to greedy "
        f"{v['mean_diff']:+.3f}, "
        f"95% CI {_ci(v['ci'])}, Bonferroni ({a['level']:.4f}) CI {_ci(a['ci'])}, fixed {len(v['fixed'])} / broken "
        f"{len(v['broken'])} of {v['n']}; {nulls}. Verdict: {verdict}."
    )


def matrix_markdown(s: dict) -> str:
    cfg = s["config"]
    out = [
        "# The decision matrix: draft guidance vs greedy decoding",
        "",
        f"{s['n_tasks']} tasks ({', '.join(f'{k}: {v}' for k, v in s['categories'].items())}); readouts: "
        + ", ".join(f"{k} = `{v}`" for k, v in cfg["readouts"].items())
        + f"; betas {', '.join(f'{b:g}' for b in cfg['betas'])}; {cfg['max_new_tokens']} new tokens; scored by the "
        "tasks' rule checks.",
        "",
        "## Rows",
        "",
        "Solve rate with its 95% bootstrap CI over tasks; the paired per-task difference to greedy (95% CI) and "
        "the tasks fixed / broken against greedy.",
        "",
        "| group | row | n | solve rate [95% CI] | vs greedy [95% CI] | fixed / broken |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in s["rows"]:
        v = e.get("vs_greedy")
        vs = f"{v['mean_diff']:+.3f} {_ci(v['ci'])}" if v else "(reference)"
        fb = f"{len(v['fixed'])} / {len(v['broken'])}" if v else "-"
        out.append(
            f"| {e['group']} | {e['row']} | {e['n']} | {e['solve_rate']:.3f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] "
            f"| {vs} | {fb} |"
        )
    out += [
        "",
        "## Which row of the decision matrix holds",
        "",
        f"**{s['decision']}.**",
        "",
        "Rule: a family beats greedy when its best configuration's paired difference to greedy has a "
        "Bonferroni-widened "
        "bootstrap CI (over the family's configurations) above 0 and its paired difference to each null at the same "
        "beta "
        "has a 95% CI above 0; 2.3 > 2.2 when the best TTT configuration beats its no-TTT twin (95% CI above 0).",
        "",
        _decide_text("2.2 guided without TTT", s["best_2_2"]),
        _decide_text("2.3 TTT + guided", s["best_2_3"]),
    ]
    t = s.get("ttt_over_twin")
    if t:
        out.append(f"- 2.3 vs 2.2: `{s['best_2_3']['row']}` minus `{t['twin']}`: {t['mean_diff']:+.3f} {_ci(t['ci'])}.")
    vs = s.get("best_2_2_vs_best_sharpening")
    if vs:
        out.append(
            f"- Against the best sharpening baseline (`{vs['baseline']}`): `{s['best_2_2']['row']}` minus it "
            f"{vs['mean_diff']:+.3f} {_ci(vs['ci'])}."
        )
    if s["decision"] == "all about baseline":
        out += [
            "",
            "This is a null result: no guided configuration beats greedy decoding by more than the CIs allow (and more "
            "than the null controls give). Next steps of the research plan, and what the project supports:",
            "",
        ]
    else:
        out += ["", "Next steps of the research plan, and what the project supports:", ""]
    out += [f"- {what}: {how}." for what, how in NEXT_STEPS]
    out += [
        "",
        "## 2.5: where guidance changes the output",
        "",
        "Flips: new tokens where the row's choice differs from the target's argmax. The guided token's word (a run of "
        "word "
        "characters, as the diagnostic v2 tags) is tagged *context word* when it occurs as a whole word in the task's "
        "context "
        "(system and user turns), *missed* when it is a context word that greedy's response does not use; the target's "
        "word "
        "is known only up to the flipped token's end (its continuation was not decoded), tagged when a context word "
        "starts "
        "with it. *first*: each task's first flip, the only one on greedy's own path. The null rows give the chance "
        "level.",
        "",
        "| row | flips / token | flips | guided word in context (all / first / fixed / broken) | missed context word "
        "(all / first) | target word in context (all / first) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in s["rows"]:
        f = e.get("flips")
        if not f:
            continue
        out.append(
            f"| {e['row']} | {_pct(f['flips_per_token'])} | {f['n_flips']} | {_pct(f['all']['context_word'])} / "
            f"{_pct(f['first']['context_word'])} / {_pct(f['fixed']['context_word'])} / "
            f"{_pct(f['broken']['context_word'])} | "
            f"{_pct(f['all']['missed_context_word'])} / {_pct(f['first']['missed_context_word'])} | "
            f"{_pct(f['all']['target_word_in_context'])} / {_pct(f['first']['target_word_in_context'])} |"
        )
    if s["flip_examples"]:
        out += [
            "",
            "Example flips of the best guided configuration (tasks fixed first, then broken):",
            "",
            "| task | outcome | offset | target token | guided token | guided word | context word |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x in s["flip_examples"]:
            tt, gt = (repr(x[k]).replace("|", "\\|") for k in ("target_text", "guided_text"))
            out.append(
                f"| {x['task_id']} | {x['outcome']} | {x['i']} | `{tt}` | `{gt}` | {x['guided_word']} | "
                f"{x['context_word']} |"
            )
    if s.get("failure_classes"):
        from draftguide.experiments.taxonomy import flip_markdown

        out += [
            "",
            "## 3.1: which failure classes guidance fixes and which it causes",
            "",
            "Each failed response is classed (`draftguide.experiments.taxonomy`: no answer, partially right, reverted "
            "to the prior / distractor, another item of the context, other); per row, against greedy:",
        ]
        for name, table in s["failure_classes"].items():
            out += ["", f"### {name}", "", flip_markdown(table, "greedy", name)]
    out += [
        "",
        "## Runs this report refers to but does not run",
        "",
        "The TTT diagnostic and delta-tau (plan 1.3 / 1.4) and the TTT sweep (1.5) are separate runs (CPU time): run "
        "them "
        "and pass their folders to `draftguide report` next to this one:",
        "",
        "    draftguide diagnose --drafts smollm2-135m-readout,smollm2-135m-dflash --ttt --tasks builtin --out "
        "runs/diagnose_ttt_readout",
        "    draftguide diagnose --drafts smollm2-135m-dflash,smollm2-135m-readout --ttt --tasks builtin --out "
        "runs/diagnose_ttt_dflash",
        "    draftguide ttt-tau --draft smollm2-135m-dflash --out runs/ttt_tau   # tau needs a speculative draft",
        "    draftguide sweep ttt --draft smollm2-135m-dflash --steps 0,4,16,64 --lr 3e-4,1e-3,3e-3 --rank 4,8,16 "
        "--out runs/sweep_ttt",
        "",
        "Per-task scores of every row: `per_task.jsonl`; each row's own run folder holds its results.jsonl.",
        "",
    ]
    return "\n".join(out)


__all__ = ["MatrixConfig", "analyse", "finish_matrix", "flip_tags", "paired", "plan", "run_matrix"]
