"""Plain-text tables the `draftguide` commands print at the end of a run: pure functions from a run's summary
dict to a string (no trailing newline), so each table can be tested without running the command."""

from __future__ import annotations

from draftguide.reporting.runs import fmt


def _num(x) -> str:
    """A 3-decimal figure, '-' for None (NaN prints as nan: unlike `fmt`, a NaN here is not hidden)."""
    return "-" if x is None else f"{x:.3f}"


def speculate_table(s: dict, baseline: bool = True) -> str:
    """`draftguide speculate`: tau, speed and losslessness of one run (`baseline`: the greedy timing ran)."""
    lines = [
        f"{'prompts':>8} {'tau':>6} {'tok/s':>8} {'base tok/s':>11} {'speedup':>8} {'lossless':>9}",
        f"{s['n_prompts']:>8} {fmt(s['tau']):>6} {fmt(s['tokens_per_s'], '.1f'):>8} "
        f"{fmt(s.get('baseline_tokens_per_s'), '.1f'):>11} "
        f"{fmt(s.get('speedup')):>8} {str(s.get('lossless')):>9}",
    ]
    if s.get("tau_missing"):
        lines.append(f"tau -: {s['tau_missing']}")
    if not baseline:
        lines.append("base tok/s, speedup -: no baseline run (--no-baseline)")
    return "\n".join(lines)


def bench_tau_table(sets: dict[str, dict]) -> str:
    """`draftguide bench-tau`: one row per benchmark set (set name -> `run_speculate` summary), then why tau is
    missing where it is."""
    lines = [f"{'set':<18} {'n':>4} {'tau':>6} {'tok/s':>7} {'base':>7} {'speedup':>8} {'vs HF':>6} {'lossless':>9}"]
    for k, v in sets.items():
        lines.append(
            f"{k:<18} {v['n_prompts']:>4} {fmt(v['tau']):>6} {fmt(v['tokens_per_s'], '.1f'):>7} "
            f"{fmt(v['baseline_tokens_per_s'], '.1f'):>7} "
            f"{fmt(v['speedup']):>8} {fmt(v['speedup_vs_hf_generate']):>6} {str(v['lossless']):>9}"
        )
    lines += [f"{k}: tau -: {v['tau_missing']}" for k, v in sets.items() if v.get("tau_missing")]
    return "\n".join(lines)


def ablation_table(s: dict) -> str:
    """`draftguide ablate-layers`: per layer set, training, fidelity at k=1 and the diagnostic's verdict."""
    rows = [
        f"{'set':<22} {'steps':>9} {'loss':>7} {'fid k=1':>8} {'null':>6} {'verdict':>13} {'dlogp all':>10} "
        f"{'failed':>8}"
    ]
    for r in s["rows"]:
        f, d = r.get("fidelity") or {}, r.get("diagnostic") or {}
        rows.append(
            f"{r['set']:<22} {str(r['steps']) + '/' + str(r['total_steps']):>9} {_num(r['final_loss']):>7} "
            f"{_num(f.get('top1_agreement_k1')):>8} {_num(f.get('null_top1_agreement_k1')):>6} "
            f"{d.get('verdict', '-'):>13} "
            f"{_num((d.get('all') or {}).get('mean')):>10} {_num((d.get('failed') or {}).get('mean')):>8}"
        )
    return "\n".join(rows)


def probe_table(s: dict) -> str:
    """`draftguide probe`: probe accuracy with its CI, the shuffled-label control and zero-shot per
    representation (target last state, layers by depth, draft)."""
    from draftguide.experiments.probe import order

    lines = [
        f"{s['n_tasks']} tasks ({s['n_skipped']} skipped)",
        f"{'representation':<16} {'probe':>22} {'shuffled':>8} {'zero-shot':>9}",
    ]
    for name in order(s["representations"]):
        r = s["representations"][name]
        shuffled = r["shuffled"]["accuracy"] if "shuffled" in r else float("nan")
        lines.append(
            f"{name:<16} {r['accuracy']:>6.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
            f"{shuffled:>8.3f} {r['zero_shot']['accuracy']:>9.3f}"
        )
    return "\n".join(lines)


def diagnose_summary(s: dict, answer_frame: str, ttt: bool = False) -> str:
    """`draftguide diagnose`: log p and rank of each readout against the target per mode, the verdicts, and
    (`ttt`) the adapted draft's gain over the base draft."""
    lines = [
        f"{s['n_tasks']} tasks, {s['n_tokens']} answer tokens ({s['n_skipped']} tasks skipped without a reference); "
        f"answer frame {answer_frame} {s['answer_frame']['tasks_by_frame']}"
    ]
    for mode, g in s["modes"].items():
        a = g["all"]
        for name in s["readouts"]:
            lines.append(
                f"{mode:>6} {name}: mean log p target {a['mean_logp']['target']['mean']:.3f}  readout "
                f"{a['mean_logp'][name]['mean']:.3f}  "
                f"median rank target {a['median_rank']['target']['median']:.0f}  readout "
                f"{a['median_rank'][name]['median']:.0f}  "
                f"rank win {a['rank_vs_target'][name]['win']['mean']:.2f}"
            )
    lines += [f"verdict {name}: {v['verdict']} -- {v['because']}" for name, v in s["verdict_details"].items()]
    if ttt:
        lines += _diagnose_ttt_lines(s["ttt"])
    return "\n".join(lines)


def _diagnose_ttt_lines(t: dict) -> list[str]:
    lines = [
        f"   ttt {mode:>6}: mean per-task log p gain over the base draft {g['mean_per_task_logp_gain']:+.3f} "
        f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
        for mode, g in t["gain_over_base"].items()
    ]
    lines.append(
        f"ttt verdict: {t['verdict']} -- {t['verdict_detail']['because']}; context loss "
        f"{t['mean_context_loss_before']:.3f} -> {t['mean_context_loss_after']:.3f}, "
        f"{t['mean_ttt_seconds']:.2f} s TTT per task"
    )
    return lines


def profile_table(s: dict) -> str:
    """`draftguide profile`: median milliseconds per operation (prefill by context length, then the decode,
    draft, TTT and guided costs), then the achieved and measured memory bandwidth."""
    from draftguide.experiments.profiling import cost_rows

    lines = [f"{'operation':<52} {'median ms':>10}"]
    for r in s["prefill"]:
        lines.append(f"{'target prefill, ' + str(r['context_len']) + ' tokens':<52} {1e3 * r['median_s']:>10.2f}")
    lines += [f"{name:<52} {1e3 * sec:>10.2f}  {note}" for name, sec, note in cost_rows(s)]
    m = s["memory_bandwidth"]
    lines.append(
        f"decode bandwidth {s['decode']['achieved_bandwidth_GBps']:.2f} GB/s; measured read {m['read_GBps']:.2f} GB/s, "
        f"copy {m['copy_GBps']:.2f} GB/s ({100 * s['bandwidth_fraction']:.0f}% of the higher)"
    )
    return "\n".join(lines)


def memory_summary(m: dict, context: int, draft: bool) -> str:
    """`draftguide profile --memory-only`: one line of a `memory_estimate` at `context` tokens (`draft`: the
    estimate includes a draft)."""

    def gib(b) -> str:
        return f"{b / 2**30:.2f} GiB"

    text = (
        f"{m['params'] / 1e9:.2f}B parameters, weights {gib(m['weight_bytes'])} ({m['dtype']}); a decoded token reads "
        f"{gib(m['weight_bytes_read_per_token'])} (expert fraction {m['expert_fraction']:g}); KV cache "
        f"{m['kv_bytes_per_token'] / 1024:.1f} KiB/token, {gib(m['kv_bytes_at_context'])} at {context} tokens"
    )
    if draft:
        text += f"; draft {gib(m['draft_weight_bytes'])}, features {m['feature_bytes_per_token'] / 1024:.1f} KiB/token"
    return text + f"; total at {context} tokens {gib(m['total_bytes_at_context'])}"


def beta_sweep_table(s: dict) -> str:
    """`draftguide sweep beta`: solve rate with its CI per beta for guided decoding and the noise control,
    then one row per baseline."""

    def rate(p) -> str:
        return f"{p['solve_rate']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]" if p else "-"

    noise = {p["beta"]: p for p in s["curves"]["noise"]}
    lines = [f"{'beta':>5} {'guided':>22} {'noise':>22}"]
    lines += [f"{p['beta']:>5g} {rate(p):>22} {rate(noise.get(p['beta'])):>22}" for p in s["curves"]["guided"]]
    lines += [f"{name:>5} {rate(g):>22}" for name, g in s["baselines"].items()]
    return "\n".join(lines)


def matrix_table(s: dict) -> str:
    """`draftguide matrix`: solve rate per row with its CI and the paired difference to greedy, then the
    decision."""
    lines = [f"{'row':<34} {'n':>4} {'solve rate':>22} {'vs greedy':>26}"]
    for e in s["rows"]:
        v = e.get("vs_greedy")
        vs = f"{v['mean_diff']:+.3f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]" if v else ""
        lines.append(
            f"{e['row']:<34} {e['n']:>4} {e['solve_rate']:>8.3f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] {vs:>26}"
        )
    lines.append(f"decision matrix: {s['decision']}")
    return "\n".join(lines)


def ttt_sweep_table(s: dict) -> str:
    """`draftguide sweep ttt`: context loss, readout log-prob gap and tau per (lr, rank, steps), the best
    point marked."""
    lines = [f"{'lr':>8} {'rank':>5} {'steps':>6} {'ctx loss':>9} {'logp gap':>9} {'tau':>7} {'d tau':>7}"]
    for r in s["table"]:
        mark = "  <- best" if r is s["best"] else ""
        d = "" if r["delta_tau"] is None else f"{r['delta_tau']:+.3f}"
        lines.append(
            f"{r['lr']:>8g} {r['rank']:>5} {r['steps']:>6} {r['context_loss']:>9.3f} {r['logp_gap']:>9.3f} "
            f"{r['tau']:>7.3f} {d:>7}{mark}"
        )
    return "\n".join(lines)
