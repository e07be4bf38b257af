"""Analysis commands: `fidelity` (readout agreement per block offset), `ablate-layers` (one readout per set of
target layers), `probe` (linear probes at the answer position), `profile` (compute and memory budget),
`matrix` (the decision matrix on one task set) and `report` (one markdown over run folders)."""

from __future__ import annotations

import sys

from draftguide.app.cli.common import (
    DTYPES,
    add_target_args,
    comma_list,
    draft_spec,
    int_list,
    load_models,
    load_target_from_args,
    load_task_rows,
    print_table,
    readout_names,
    resolve_device,
    task_source,
    torch_dtype,
)
from draftguide.app.cli.options import add_batch_arg, add_ttt_args, batch_size_arg, mix_arg, ttt_kwargs
from draftguide.errors import DraftGuideError


# -- fidelity --------------------------------------------------------------------------------------------------
def add_fidelity_parser(sub) -> None:
    p = sub.add_parser(
        "fidelity", help="readout fidelity per block offset (agreement, KL, log p) vs a shuffled-feature null"
    )
    add_target_args(p, device="cpu")
    p.add_argument(
        "--draft",
        default=None,
        help="comma list of drafts/readouts (folders, shipped names, init[:N]); default: the target's shipped draft",
    )
    p.add_argument("--draft-dtype", default=None, choices=sorted(DTYPES))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompts",
        help="chat prompts, a comma list of JSONL files or sources (e.g. "
        "mtbench,humaneval,sharegpt-heldout): the target's own greedy responses are generated first",
    )
    src.add_argument("--text", help="JSONL of conversations ending in an assistant turn, or raw 'text' rows")
    src.add_argument("--data", help="a folder with samples.jsonl (make-data output, or an earlier fidelity run)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="sequences (per source with --prompts)")
    p.add_argument("--no-null", action="store_true", help="skip the shuffled-feature null")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fidelity)


def _fidelity_samples(args, target, tok) -> list:
    """The sequences fidelity reads: --data samples, --text conversations, or the target's greedy responses to
    --prompts."""
    from draftguide.experiments.fidelity import Sample, samples_from_rows, target_responses
    from draftguide.modeling.prompts import read_jsonl
    from draftguide.training.data import encode_conversation, read_samples
    from draftguide.training.datasources import load_source

    if args.data:
        return samples_from_rows(read_samples(args.data))[: args.limit]
    if args.text:
        encoded = [(r, encode_conversation(tok, r)) for r in read_jsonl(args.text)[: args.limit]]
        return [Sample(str(r.get("id", i)), e[0], e[1]) for i, (r, e) in enumerate(encoded) if e is not None]
    prompts = [r for src in comma_list(args.prompts) for r in load_source(src, limit=args.limit)]
    return target_responses(target, tok, prompts, args.max_new_tokens)


def cmd_fidelity(args) -> int:
    from draftguide.experiments.fidelity import fidelity_table, run_fidelity
    from draftguide.modeling.draft_io import resolve_draft

    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    specs = comma_list(args.draft or "") or [None]
    target, tok = load_target_from_args(args, args.device)
    readouts = {}
    for name, spec in zip(readout_names(specs, args.target), specs):
        d = resolve_draft(spec, target, tok, target_name=args.target)
        readouts[name] = d.to(dtype=torch_dtype(args.draft_dtype or args.dtype))
    s = run_fidelity(
        target,
        readouts,
        _fidelity_samples(args, target, tok),
        args.out,
        null=not args.no_null,
        n_boot=args.n_boot,
        seed=args.seed,
        command=args.command,
        settings={k: v for k, v in vars(args).items() if k not in ("func", "command")},
    )
    print_table(fidelity_table(s), f"{args.out}/summary.json, fidelity.md and fidelity.png", blank_line=False)
    return 0


# -- ablate-layers ---------------------------------------------------------------------------------------------
def add_ablate_layers_parser(sub) -> None:
    p = sub.add_parser(
        "ablate-layers",
        help="layer ablation: one aligned readout per set of target layers (same data, seed and "
        "budget), each measured by fidelity and the diagnostic; table + figure",
    )
    add_target_args(p, device=None)
    p.add_argument("--data", required=True, help="make-data folder: the training samples of every set")
    p.add_argument(
        "--layer-sets",
        default=None,
        help="';'-separated comma lists of target layer ids (default for a 30-layer "
        "target: '1,8,14,20,27;1,4,7,10,13;17,20,23,26,27;27;14')",
    )
    p.add_argument("--out", required=True)
    _add_ablation_training_args(p)
    _add_ablation_measure_args(p)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_ablate_layers)


def _add_ablation_training_args(p) -> None:
    """ablate-layers: the training budget and settings every layer set shares."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--budget-minutes", type=float, default=None, help="wall time per set: the schedule is fitted into it"
    )
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per set (the same for every set)")
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--train-offsets", type=int, default=None, help="train block offsets 1..N only (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--anchors-per-seq", type=int, default=64)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--loss", default="ce", choices=["ce", "kd", "mix"])
    p.add_argument(
        "--vocab-subset",
        type=int,
        default=0,
        help="loss over the N most frequent tokens (default 0: the full vocabulary; a briefly trained readout "
        "with a subset loss puts its full-vocabulary argmax outside the subset, which fidelity then scores as 0)",
    )
    p.add_argument("--autocast", action="store_true")
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10)


def _add_ablation_measure_args(p) -> None:
    """ablate-layers: the diagnostic and fidelity each trained readout is measured by."""
    p.add_argument("--tasks", default="builtin", help="diagnostic tasks ('none': skip the diagnostic)")
    p.add_argument("--limit", type=int, default=None, help="the first N tasks")
    p.add_argument("--solved-from", default=None, help="eval results.jsonl: solve status and framing responses")
    p.add_argument(
        "--no-solve", action="store_true", help="leave solve status unknown (no greedy eval; bare answer frame)"
    )
    p.add_argument("--solve-max-new-tokens", type=int, default=256)
    p.add_argument("--controls", default="shuffle,gauss")
    p.add_argument(
        "--fidelity-data",
        default=None,
        help="folder with samples.jsonl for fidelity (default: the target's greedy responses to the tasks' prompts)",
    )
    p.add_argument("--fidelity-limit", type=int, default=64, help="fidelity sequences (0: skip fidelity)")
    p.add_argument("--fidelity-max-new-tokens", type=int, default=64)


def _ablation_config(args):
    """The validated `TrainConfig` every layer set trains with (an aligned readout)."""
    from draftguide.training.train import TrainConfig

    if args.steps is not None and args.steps < 1 or args.budget_minutes is not None and args.budget_minutes <= 0:
        raise DraftGuideError("--steps and --budget-minutes must be positive")
    return TrainConfig(
        block_size=args.block_size,
        draft_layers=args.draft_layers,
        anchors_per_seq=args.anchors_per_seq,
        batch_size=args.batch_size,
        max_len=args.max_len,
        steps=args.steps,
        lr=args.lr,
        loss=args.loss,
        vocab_subset=args.vocab_subset or None,
        autocast=args.autocast,
        log_every=args.log_every,
        mask_token_id=args.mask_token_id,
        seed=args.seed,
        train_offsets=args.train_offsets,
        context_includes_anchor=True,
        time_budget_s=args.budget_minutes * 60 if args.budget_minutes else None,
    ).validate()


def _ablation_solved(args, target, tok, tasks: list, out) -> tuple[dict | None, dict | None]:
    """(solve status, framing responses) from --solved-from, else from a greedy eval of the tasks (unless
    --no-solve or no tasks)."""
    from draftguide.experiments.diagnose import compute_solved, results_field, solved_from

    solved = solved_from(args.solved_from) if args.solved_from else None
    responses = results_field(args.solved_from, "response") if args.solved_from else None
    if tasks and solved is None and not args.no_solve:
        settings = {"target": args.target, "dtype": DTYPES[args.dtype], "tasks": args.tasks}
        solved, folder = compute_solved(target, tok, tasks, out, args.solve_max_new_tokens, settings)
        if (folder / "results.jsonl").is_file():
            responses = results_field(folder / "results.jsonl", "response")
    return solved, responses


def _ablation_fidelity_samples(args, target, tok, tasks: list) -> list | None:
    """Fidelity's sequences: --fidelity-data, else the target's greedy responses to the tasks' (or the built-in
    suite's) prompts; None with --fidelity-limit 0."""
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.fidelity import samples_from_rows, target_responses
    from draftguide.training.data import read_samples

    if not args.fidelity_limit:
        return None
    if args.fidelity_data:
        return samples_from_rows(read_samples(args.fidelity_data))[: args.fidelity_limit]
    prompts = tasks[: args.fidelity_limit] or load_tasks("builtin")[0][: args.fidelity_limit]
    return target_responses(target, tok, prompts, args.fidelity_max_new_tokens)


def cmd_ablate_layers(args) -> int:
    from pathlib import Path

    from draftguide.experiments.ablate import DEFAULT_SETS, parse_layer_sets, run_ablation
    from draftguide.experiments.diagnostic import CONTROLS
    from draftguide.reporting.tables import ablation_table

    controls = comma_list(args.controls)
    if any(c not in CONTROLS for c in controls):
        raise DraftGuideError(f"--controls {args.controls!r}: expected a comma list of {', '.join(CONTROLS)}")
    cfg = _ablation_config(args)
    if not Path(args.data).is_dir():
        raise DraftGuideError(f"--data '{args.data}' is not a folder (make-data output)")
    tasks = [] if args.tasks == "none" else load_task_rows(args)
    target, tok = load_target_from_args(args, resolve_device(args))
    sets = parse_layer_sets(args.layer_sets or DEFAULT_SETS, target.config.get_text_config().num_hidden_layers)
    out = Path(args.out)
    solved, responses = _ablation_solved(args, target, tok, tasks, out)
    s = run_ablation(
        target,
        tok,
        args.data,
        tasks,
        out,
        sets,
        cfg,
        fidelity_samples=_ablation_fidelity_samples(args, target, tok, tasks),
        solved=solved,
        responses=responses,
        frame="framed" if responses else "bare",
        controls=controls,
        n_boot=args.n_boot,
        seed=args.seed,
        command=args.command,
    )
    print_table(ablation_table(s), f"{out}/summary.json, ablation.md and ablation.png")
    return 0


# -- probe -----------------------------------------------------------------------------------------------------
def add_probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probes at the answer position: do the target's last state, the draft's final state "
        "and each selected target layer tell the reference answer from the distractor?",
    )
    add_target_args(p, device="cpu", draft=True)
    p.add_argument(
        "--tasks",
        default="builtin",
        help="JSONL of suite rows with reference_answer and distractor_answer, or 'builtin'",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="the first N tasks")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by context (default 5)")
    p.add_argument("--shuffles", type=int, default=5, help="label shufflings of the control (default 5; 0: none)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression (default 1)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    from draftguide.experiments.probe import run_probe
    from draftguide.reporting.tables import probe_table

    if args.folds < 2 or args.shuffles < 0 or args.C <= 0:
        raise DraftGuideError("--folds must be >= 2, --shuffles >= 0 and --C > 0")
    tasks = load_task_rows(args)
    target, tok, draft = load_models(args)
    s = run_probe(
        target,
        tok,
        draft,
        tasks,
        args.out,
        folds=args.folds,
        n_boot=args.n_boot,
        shuffles=args.shuffles,
        seed=args.seed,
        C=args.C,
        command=args.command,
        settings={
            "target": args.target,
            "draft": args.draft or "shipped",
            "dtype": DTYPES[args.dtype],
            "tasks": task_source(args.tasks),
            "limit": args.limit,
        },
    )
    print_table(probe_table(s), f"{args.out}/summary.json, report.md, probe.png, examples.jsonl and features.npz")
    return 0


# -- profile ---------------------------------------------------------------------------------------------------
def add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="compute budget: prefill vs context, draft, speculative, TTT and guided costs, decode bandwidth"
    )
    add_target_args(p, device="cpu", draft=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--context-lens", type=int_list, default="256,512,1024,2048,4096", help="comma list of prefill context lengths"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per decode/speculative/guided run")
    p.add_argument("--anchors", type=int, default=64, help="blocks in the multi-anchor draft pass")
    p.add_argument("--ttt-steps", type=int, default=4)
    p.add_argument("--ttt-context", type=int, default=1024, help="TTT context length (the nearest of --context-lens)")
    p.add_argument("--copy-mb", type=int, default=256, help="tensor size of the read/copy bandwidth measurement")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory estimate from the configs (no weights loaded): weights, bytes read per decoded token "
        "(active experts only for MoE), KV cache and draft features at the largest --context-lens",
    )
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from draftguide.experiments.profiling import run_profile
    from draftguide.reporting.tables import profile_table

    lens = args.context_lens
    if not lens or min(lens) < 2:
        raise DraftGuideError(f"--context-lens {lens}: expected a comma list of integers >= 2")
    if args.memory_only:
        return _memory_only(args, max(lens))
    if min(args.repeats, args.new_tokens, args.anchors, args.ttt_steps, args.copy_mb) < 1:
        raise DraftGuideError("--repeats, --new-tokens, --anchors, --ttt-steps and --copy-mb must be >= 1")
    target, tok, draft = load_models(args)
    s = run_profile(
        target,
        tok,
        draft,
        args.out,
        context_lens=lens,
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        anchors=args.anchors,
        ttt_steps=args.ttt_steps,
        ttt_context=args.ttt_context,
        copy_megabytes=args.copy_mb,
        command=args.command,
        settings={"target": args.target, "draft": args.draft or "shipped", "dtype": DTYPES[args.dtype]},
    )
    print_table(profile_table(s), f"{args.out}/summary.json, report.md and profile.png")
    return 0


def _memory_only(args, context: int) -> int:
    """profile --memory-only: the estimate from the target's (and draft's) config, no weights loaded."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from draftguide.experiments.profiling import memory_estimate
    from draftguide.modeling.draft_io import config_from_dict, draft_path
    from draftguide.modeling.targets import resolve_target
    from draftguide.reporting.runs import write_json
    from draftguide.reporting.tables import memory_summary

    try:
        config = AutoConfig.from_pretrained(resolve_target(args.target))
    except OSError as e:
        raise DraftGuideError(f"no config for target '{args.target}': {str(e).splitlines()[0]}") from e
    dcfg = None
    if args.draft and not args.draft.startswith("init"):
        path = Path(draft_path(args.draft)) / "config.json"
        if not path.is_file():
            raise DraftGuideError(f"'{path}' does not exist")
        dcfg = config_from_dict(json.loads(path.read_text()), path)
    m = memory_estimate(config, dtype=torch_dtype(args.dtype), context_tokens=context, draft_config=dcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "memory.json", m | {"target": args.target, "draft": args.draft, "command": args.command})
    print_table(memory_summary(m, context, draft=bool(dcfg)), f"{out}/memory.json", blank_line=False)
    return 0


# -- report ----------------------------------------------------------------------------------------------------
def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="one paper-style markdown over diagnose/eval/speculate/bench-tau/profile/... run folders"
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (unknown ones are skipped with a warning)")
    p.add_argument("--out", required=True, help="folder for report.md and its figures")
    p.set_defaults(func=cmd_report, run_folder=False)


def cmd_report(args) -> int:
    from draftguide.reporting.report import write_report

    path = write_report(args.runs, args.out, command=args.command)
    print(f"wrote {path}")
    return 0


# -- matrix ----------------------------------------------------------------------------------------------------
def add_matrix_parser(sub) -> None:
    p = sub.add_parser(
        "matrix",
        help="the research plan's decision matrix on one task set: greedy, sampling, guided per readout "
        "and beta, TTT + guided, noise and shuffled-readout nulls, Power Sampling, DoLa, adaptive beta",
    )
    p.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows with checks, or 'builtin'")
    p.add_argument("--out", required=True)
    add_target_args(p, device=None)
    p.add_argument(
        "--readouts",
        default="auto",
        help="comma list of readouts to guide with (folders, shipped names, init[:N]); auto: the target's aligned "
        "readout (when shipped) and its speculative draft. The first is the default readout (nulls, adaptive, TTT)",
    )
    p.add_argument("--betas", default="0.25,0.5,1", help="comma list in (0, 1]; beta 0 (greedy) always runs")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="the first N tasks (the built-in suite cycles through its 16 subcategories: N = 16k is balanced)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--nulls", default="noise,shuffle", help="comma list of noise, shuffle ('' for none)")
    p.add_argument("--baselines", default="sample,power,dola", help="comma list of sample, power, dola ('' for none)")
    p.add_argument("--no-ttt", action="store_true", help="skip the TTT + guided rows (2.3)")
    p.add_argument(
        "--ttt-readouts",
        default=None,
        help="comma list of readouts (labels or specs) TTT runs with (default: the first)",
    )
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-beta rows")
    p.add_argument(
        "--sample-temperature", type=float, default=0.7, help="temperature of the sampling baseline (default 0.7)"
    )
    p.add_argument("--power-preset", default=None, help="Power Sampling preset (default: cpu on a CPU, paper on a GPU)")
    p.add_argument(
        "--mix",
        type=mix_arg,
        default=None,
        metavar="{logits,probs}",
        help="the mix of every guided row (default logits)",
    )
    p.add_argument(
        "--guard-top-k", type=int, default=None, help="every guided row only re-ranks the target's top-k tokens"
    )
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    add_batch_arg(p)
    add_ttt_args(p)
    p.set_defaults(func=cmd_matrix)


def _shipped_readout_specs(target: str) -> list[str]:
    """--readouts auto: the target's aligned readout (when installed) and its speculative draft."""
    from draftguide.modeling.draft_io import SHIPPED_DRAFTS, SHIPPED_READOUTS

    readout, spec = SHIPPED_READOUTS.get(target), SHIPPED_DRAFTS.get(target)
    specs = []
    if readout is not None and (readout / "config.json").is_file():
        specs.append(str(readout))
    elif readout is not None:
        print(
            f"draftguide: note: the aligned readout '{readout.name}' is not shipped in this install; the matrix "
            "guides "
            "with the speculative draft only",
            file=sys.stderr,
        )
    if spec is not None and spec.is_dir():
        specs.append(str(spec))
    if not specs:
        raise DraftGuideError(f"no shipped readout or draft for target '{target}': pass --readouts")
    return specs


def _matrix_readouts(args) -> dict[str, str]:
    """label -> draft spec: `aligned` / `speculative` by each readout's config (repeats numbered)."""
    from draftguide.modeling.draft_io import is_aligned_readout

    if args.readouts.strip() == "auto":
        specs = _shipped_readout_specs(args.target)
    else:
        specs = comma_list(args.readouts)
        if not specs:
            raise DraftGuideError(f"--readouts {args.readouts!r}: expected a comma list of readouts")
    out: dict[str, str] = {}
    for spec in specs:
        spec = draft_spec(args, "guidance", spec)
        base = "aligned" if is_aligned_readout(spec) else "speculative"
        label, i = base, 2
        while label in out:
            label, i = f"{base}{i}", i + 1
        out[label] = spec
    return out


def _ttt_readout_labels(args, readouts: dict[str, str]) -> list[str]:
    """--ttt-readouts as readout labels (each given as a label or a spec); [] without the flag or with --no-ttt."""
    if args.no_ttt or not args.ttt_readouts:
        return []
    labels, by_spec = [], {v: k for k, v in readouts.items()}
    for r in comma_list(args.ttt_readouts):
        label = r if r in readouts else by_spec.get(draft_spec(args, "guidance", r))
        if label is None:
            raise DraftGuideError(f"--ttt-readouts: {r!r} is not among the readouts ({', '.join(readouts)})")
        labels.append(label)
    return labels


def _matrix_config(args, device: str):
    """The validated `MatrixConfig` of matrix's flags (the Power Sampling preset follows `device`)."""
    from draftguide.decode.baselines import POWER_PRESETS
    from draftguide.experiments.matrix import MatrixConfig
    from draftguide.experiments.sweeps import parse_betas

    betas = [b for b in parse_betas(args.betas) if b > 0]
    if not betas:
        raise DraftGuideError(f"--betas {args.betas!r}: give at least one beta in (0, 1] (greedy, beta 0, always runs)")
    readouts = _matrix_readouts(args)
    ttt_readouts = _ttt_readout_labels(args, readouts)
    guided = {k: v for k, v in dict(mix=args.mix, guard_top_k=args.guard_top_k).items() if v is not None}
    preset = args.power_preset or ("paper" if str(device).startswith("cuda") else "cpu")
    if preset not in POWER_PRESETS:
        raise DraftGuideError(f"--power-preset {preset!r}: expected one of {', '.join(POWER_PRESETS)}")
    return MatrixConfig(
        betas=betas,
        readouts=readouts,
        ttt=None if args.no_ttt else ttt_kwargs(args, args.seed),
        ttt_readouts=ttt_readouts,
        nulls=tuple(comma_list(args.nulls)),
        baselines=tuple(comma_list(args.baselines)),
        adaptive=not args.no_adaptive,
        max_new_tokens=args.max_new_tokens,
        guided_options=guided,
        n_boot=args.n_boot,
        seed=args.seed,
        baseline_options={
            "sample": {"temperature": args.sample_temperature, "seed": args.seed},
            "power": {"preset": preset, "seed": args.seed},
        },
    ).validate()


def cmd_matrix(args) -> int:
    from draftguide.experiments.evaluate import check_judge
    from draftguide.experiments.matrix import run_matrix
    from draftguide.reporting.tables import matrix_table

    device = resolve_device(args)
    cfg = _matrix_config(args, device)
    batch = batch_size_arg(
        args, [b for b in cfg.baselines if b in ("power", "dola")] + (["speculative"] if cfg.ttt else [])
    )
    tasks = load_task_rows(args)
    check_judge(tasks, "rules")  # every task needs checks: the matrix scores by rules
    target, tok = load_target_from_args(args, device)
    s = run_matrix(
        target,
        tok,
        tasks,
        args.out,
        cfg,
        command=args.command,
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": task_source(args.tasks)}
        | ({"chat_template_kwargs": args.chat_template_kwargs} if args.chat_template_kwargs else {}),
        batch_size=batch,
    )
    print_table(matrix_table(s), f"{args.out}/summary.json, report.md and per_task.jsonl")
    return 0
