"""Evaluation commands: `tasks build` (the built-in suite), `eval` (generate, judge, summarise; torchrun-ready),
`sweep ttt` / `sweep beta` (parameter sweeps) and `flips` (the error-taxonomy flip table of two eval runs)."""

from __future__ import annotations

import os

from draftguide.app.cli.common import (
    DTYPES,
    add_target_args,
    comma_list,
    draft_spec,
    load_models,
    load_target_from_args,
    load_task_rows,
    print_table,
    resolve_device,
    task_source,
)
from draftguide.app.cli.options import (
    add_batch_arg,
    add_guided_ttt_args,
    add_method_args,
    add_ttt_args,
    batch_size_arg,
    flags_for,
    guided_ttt,
    method_options,
    ttt_config,
)
from draftguide.errors import DraftGuideError


# -- tasks build -----------------------------------------------------------------------------------------------
def add_tasks_parser(sub) -> None:
    p = sub.add_parser("tasks", help="the built-in context-learning task suite")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    b = tsub.add_parser("build", help="generate tasks (CL-bench rows with reference answers and checks) as JSONL")
    b.add_argument("--out", required=True, help="FILE.jsonl")
    b.add_argument("--n-per-subcategory", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_tasks_build, run_folder=False)  # --out is a file


def cmd_tasks_build(args) -> int:
    from draftguide.experiments.tasks import build_tasks, write_tasks

    rows = build_tasks(args.n_per_subcategory, args.seed)
    print(f"{len(rows)} tasks in {write_tasks(rows, args.out)}")
    return 0


# -- eval ------------------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="context-learning evaluation: generate, score, summarise (resumable, torchrun-ready)"
    )
    p.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows, or 'builtin' (the shipped suite)")
    p.add_argument("--out", required=True)
    add_target_args(p, device=None, draft=True, draft_dtype=False)
    p.add_argument(
        "--method", default="greedy", help="greedy, sample, guided, guided-noise, guided-shuffle, power or dola"
    )
    add_method_args(p)
    g = p.add_argument_group("sampling (methods sample, guided, guided-noise; default greedy, sample: 1.0)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    add_guided_ttt_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="the first N tasks")
    p.add_argument(
        "--judge", default="auto", choices=["auto", "rules", "llm"], help="auto: rules where a row has checks, else llm"
    )
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--judge-prompt-file", default=None, help="judge prompt with {rubrics} and {response} placeholders")
    p.add_argument("--skip-bad", action="store_true", help="record malformed task rows and go on")
    add_batch_arg(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from draftguide.experiments.evaluate import check_judge, check_method, format_table, load_tasks, run_eval

    check_method(args.method, args.max_new_tokens)
    opts = _eval_seed(method_options(args, args.method), args.method, args.out)
    tasks, bad = load_tasks(args.tasks, skip_bad=args.skip_bad)
    tasks = tasks[: args.limit]
    judge = _llm_judge(args) if check_judge(tasks, args.judge) else None
    single = (
        args.method
        if args.method in ("power", "dola")
        else "speculative"
        if opts.get("speculative") or opts.get("ttt")
        else None
    )
    batch = batch_size_arg(args, [single] if single else [])  # before the model loads
    target, tok = load_target_from_args(args, resolve_device(args, per_rank=True))
    s = run_eval(
        target,
        tok,
        tasks,
        args.out,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        judge=args.judge,
        llm_judge=judge,
        method_options=opts,
        bad_rows=bad,
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": task_source(args.tasks)},
        batch_size=batch,
        chat_template_kwargs=args.chat_template_kwargs,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print_table(format_table(s), f"{args.out}/results.jsonl and {args.out}/summary.json")
    return 0


def _llm_judge(args):
    """The LLM judge of the --judge-* flags."""
    from draftguide.experiments.judge import LLMJudge, load_prompt

    return LLMJudge(
        args.judge_model,
        args.judge_base_url,
        timeout=args.judge_timeout,
        prompt=load_prompt(args.judge_prompt_file),
    )


def _eval_seed(opts: dict, method: str, out: str) -> dict:
    """A sampling eval without --seed draws a fresh seed (recorded in the run's settings and summary), so
    unseeded runs do not repeat each other; a rerun into the same --out resumes with the seed it recorded."""
    import json
    from pathlib import Path

    from draftguide.modeling.sampling import effective_temperature, resolve_seed

    samples = method in ("sample", "power") or (
        method == "guided" and effective_temperature(opts.get("temperature", 0.0)) > 0
    )
    if "seed" in opts or not samples:
        return opts
    run = Path(out) / "run.json"
    try:
        seed = json.loads(run.read_text(encoding="utf-8-sig"))["method_options"]["seed"] if run.is_file() else None
    except (ValueError, KeyError, TypeError):
        seed = None
    return opts | {"seed": resolve_seed(seed if isinstance(seed, int) else None)}


# -- sweep ttt / sweep beta ------------------------------------------------------------------------------------
def add_sweep_parser(sub) -> None:
    sweep = sub.add_parser("sweep", help="parameter sweeps with tables and figures")
    sweep_sub = sweep.add_subparsers(dest="sweep_kind", required=True)
    _add_sweep_ttt_parser(sweep_sub)
    _add_sweep_beta_parser(sweep_sub)


def _add_sweep_ttt_parser(sweep_sub) -> None:
    p = sweep_sub.add_parser("ttt", help="TTT: context loss, readout log-prob gap and tau versus steps, lr and rank")
    add_target_args(p, device="cpu", draft=True)
    p.add_argument("--tasks", default="builtin", help="JSONL of tasks with reference answers, or 'builtin'")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=8, help="the first N tasks (default 8)")
    p.add_argument("--steps", default="0,4,16,64", help="comma list of TTT step counts")
    p.add_argument("--lr", default="1e-3", help="comma list of learning rates")
    p.add_argument("--rank", default="8", help="comma list of LoRA ranks")
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="length of the target's continuation tau is measured on"
    )
    p.add_argument("--seed", type=int, default=0)
    add_ttt_args(p, grid=True)
    p.set_defaults(func=cmd_sweep_ttt)


def _add_sweep_beta_parser(sweep_sub) -> None:
    b = sweep_sub.add_parser(
        "beta",
        help="solve rate vs beta for draft-guided decoding, its noise control and baselines (PNG, JSON, markdown)",
    )
    b.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows with checks, or 'builtin'")
    b.add_argument("--out", required=True)
    add_target_args(b, device=None, draft=True, draft_dtype=False)
    b.add_argument("--betas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma list in [0, 1]")
    b.add_argument(
        "--baselines", default="greedy,power,dola", help="comma list of greedy, power, dola, sample ('' for none)"
    )
    b.add_argument("--no-noise", action="store_true", help="skip the noise control")
    b.add_argument("--max-new-tokens", type=int, default=48)
    b.add_argument("--limit", type=int, default=None, help="the first N tasks")
    add_method_args(b, beta=False)
    add_guided_ttt_args(b)
    add_batch_arg(b)
    b.set_defaults(func=cmd_sweep_beta)


def cmd_sweep_ttt(args) -> int:
    from draftguide.experiments.ttt_measure import parse_list, run_sweep_ttt
    from draftguide.reporting.tables import ttt_sweep_table

    steps = parse_list(args.steps, int, "--steps")
    lrs, ranks = parse_list(args.lr, float, "--lr"), parse_list(args.rank, int, "--rank")
    if min(steps) < 0:
        raise DraftGuideError(f"--steps {args.steps!r}: step counts must be >= 0")
    for lr, rank in ((lr, rank) for lr in lrs for rank in ranks):
        ttt_config(args, steps=max(steps), lr=lr, rank=rank)  # each grid point valid, before loading models
    ttt = ttt_config(args, steps=max(steps), lr=lrs[0], rank=ranks[0])  # the options the grid does not vary
    tasks = load_task_rows(args)
    target, tok, draft = load_models(args)
    s = run_sweep_ttt(
        target,
        tok,
        draft,
        tasks,
        args.out,
        ttt,
        steps=steps,
        lrs=lrs,
        ranks=ranks,
        max_new_tokens=args.max_new_tokens,
        command=args.command,
    )
    print_table(ttt_sweep_table(s), f"{args.out}/points.jsonl, summary.json, report.md and sweep.png")
    return 0


def cmd_sweep_beta(args) -> int:
    from draftguide.experiments.sweeps import parse_betas, run_beta_sweep, sweep_runs
    from draftguide.reporting.tables import beta_sweep_table

    betas = parse_betas(args.betas)
    baselines = comma_list(args.baselines)
    sweep_runs(betas, baselines)  # unknown baselines fail here
    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    guided_opts = flags_for(args, "guided") | ({"ttt": guided_ttt(args)} if args.ttt else {})
    base_opts = {m: flags_for(args, m) for m in baselines if m != "greedy"}
    draft = draft_spec(args, "speculative" if args.speculative else "guidance")
    tasks = load_task_rows(args)
    device = resolve_device(args)
    batch = batch_size_arg(
        args,
        [m for m in baselines if m in ("power", "dola")]
        + (["speculative"] if guided_opts.get("speculative") or guided_opts.get("ttt") else []),
    )
    target, tok = load_target_from_args(args, device)
    s = run_beta_sweep(
        target,
        tok,
        tasks,
        args.out,
        betas=betas,
        draft=draft,
        max_new_tokens=args.max_new_tokens,
        baselines=baselines,
        noise=not args.no_noise,
        guided_options=guided_opts,
        baseline_options=base_opts,
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": task_source(args.tasks)},
        batch_size=batch,
    )
    print_table(beta_sweep_table(s), f"{args.out}/summary.json, report.md, beta_sweep.png and flips.jsonl")
    return 0


# -- flips -----------------------------------------------------------------------------------------------------
def add_flips_parser(sub) -> None:
    p = sub.add_parser(
        "flips",
        help="error taxonomy flip table of two eval runs: which failure classes the other run fixes and which it "
        "causes",
    )
    p.add_argument("--base", required=True, help="eval run folder of the baseline (e.g. greedy)")
    p.add_argument("--other", required=True, help="eval run folder to compare (e.g. guided)")
    p.add_argument(
        "--tasks", default="builtin", help="task rows, to classify runs written before the taxonomy (default builtin)"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_flips)


def cmd_flips(args) -> int:
    from pathlib import Path

    from draftguide.experiments.evaluate import RESULTS, load_tasks
    from draftguide.experiments.taxonomy import flip_markdown, flip_table
    from draftguide.modeling.prompts import read_jsonl
    from draftguide.reporting.runs import write_json

    rows = {}
    for key in ("base", "other"):
        path = Path(getattr(args, key)) / RESULTS
        if not path.is_file():
            raise DraftGuideError(f"'{path}' does not exist: --{key} must be an eval run folder")
        rows[key] = read_jsonl(path)
    tasks = load_tasks(args.tasks, skip_bad=True)[0]
    t = flip_table(rows["base"], rows["other"], tasks)
    names = (Path(args.base).name, Path(args.other).name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "flips.json",
        t | {"kind": "flips", "base": str(args.base), "other": str(args.other), "command": args.command},
    )
    md = flip_markdown(t, *names)
    (out / "flips.md").write_text(f"# Failure classes: {names[1]} vs {names[0]}\n\nCommand: `{args.command}`\n\n{md}\n")
    print_table(md, f"{out}/flips.json and flips.md", blank_line=False)
    return 0
