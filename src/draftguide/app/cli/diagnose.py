"""`draftguide diagnose`: gold-token rank and log p under the target and one or more deep readouts (teacher
forcing), with null controls and a verdict."""

from __future__ import annotations

from draftguide.app.cli.common import (
    DTYPES,
    add_target_args,
    comma_list,
    load_models,
    load_task_rows,
    print_table,
    readout_names,
    task_source,
)
from draftguide.app.cli.options import add_ttt_args, ttt_config
from draftguide.errors import DraftGuideError


def add_diagnose_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="readout diagnostic: gold-token rank and log p under the target and deep readouts (teacher forcing), with "
        "null controls and a verdict",
    )
    add_target_args(p, device="cpu", draft=True)
    p.add_argument(
        "--drafts",
        default=None,
        help="comma list of readouts scored side by side against one target forward, each with its own controls "
        "(draft folders or init[:LAYERS]; instead of --draft)",
    )
    p.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows, or 'builtin'")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="next,block", help="comma list of next, block")
    p.add_argument("--limit", type=int, default=None, help="the first N tasks")
    _add_answer_args(p)
    _add_control_args(p)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ttt",
        action="store_true",
        help="also score the (first) draft adapted (TTT) on each task's context, beside the base draft",
    )
    add_ttt_args(p)
    p.set_defaults(func=cmd_diagnose)


def _add_answer_args(p) -> None:
    """Where solve status, the reference answer and the frame it is scored in come from."""
    p.add_argument(
        "--solved-from",
        default=None,
        help="eval results.jsonl whose scores say which tasks the target solves (and whose responses frame the "
        "answers)",
    )
    p.add_argument(
        "--no-solve",
        action="store_true",
        help="without --solved-from: leave solve status unknown instead of running greedy eval",
    )
    p.add_argument(
        "--solve-max-new-tokens", type=int, default=256, help="greedy eval length when solve status is computed"
    )
    p.add_argument(
        "--reference-from", default=None, help="results.jsonl whose 'response' per task_id replaces reference_answer"
    )
    p.add_argument(
        "--answer-frame",
        default="framed",
        choices=["framed", "bare"],
        help="framed (default): score the reference after the target's own greedy response up to its answer; "
        "bare: right after the generation prompt",
    )
    p.add_argument(
        "--frame-from",
        default=None,
        help="results.jsonl with the target's greedy 'response' per task_id (default: --solved-from, or the solve run)",
    )
    p.add_argument(
        "--frame-lead",
        default=None,
        help="framed mode: the text the reference follows when the response holds neither it nor the distractor "
        "(default 'The answer is: ')",
    )


def _add_control_args(p) -> None:
    """The null controls and the equivalence margin of the verdict."""
    p.add_argument(
        "--controls",
        default=None,
        help="comma list of null controls per readout: shuffle, gauss, noise; and random (a sanity row no rule "
        "reads); default shuffle,gauss",
    )
    p.add_argument("--no-controls", action="store_true", help="no controls (the verdict is then inconclusive)")
    p.add_argument(
        "--margin", type=float, default=None, help="equivalence margin in nats per token (TOST; default 0.1)"
    )


def _checked_choices(args) -> tuple[list[str], list[str], list[str | None]]:
    """(modes, controls, readout specs) of the flags, checked before anything loads; fills in the defaults of
    --controls and --margin (they are recorded in the run's settings)."""
    from draftguide.experiments.diagnostic import CONTROLS, DEFAULT_CONTROLS, EQUIV_MARGIN, MODES
    from draftguide.modeling.draft_io import draft_path

    modes = comma_list(args.modes)
    if not modes or any(m not in MODES for m in modes):
        raise DraftGuideError(f"--modes {args.modes!r}: expected a comma list of {', '.join(MODES)}")
    if args.controls is None:
        args.controls = ",".join(DEFAULT_CONTROLS)
    if args.margin is None:
        args.margin = EQUIV_MARGIN
    controls = [] if args.no_controls else comma_list(args.controls)
    if any(c not in CONTROLS for c in controls):
        raise DraftGuideError(f"--controls {args.controls!r}: expected a comma list of {', '.join(CONTROLS)}")
    if args.drafts is not None and args.draft is not None:
        raise DraftGuideError("give --draft or --drafts, not both")
    specs = comma_list(args.drafts) if args.drafts is not None else [args.draft]
    if not specs:
        raise DraftGuideError(f"--drafts {args.drafts!r}: expected a comma list of draft folders or init[:LAYERS]")
    for spec in specs:
        if spec is not None and not spec.startswith("init") and not draft_path(spec).exists():
            raise DraftGuideError(f"draft folder '{spec}' does not exist")
    if args.margin <= 0:
        raise DraftGuideError(f"--margin must be > 0, got {args.margin}")
    return modes, controls, specs


def _load_readouts(args, specs: list[str | None]):
    """(target, tokenizer, {name: readout}): the first spec loads with the target; --drafts adds the others in
    the first one's device and dtype."""
    from draftguide.modeling.draft_io import resolve_draft

    args.draft = specs[0]
    target, tok, first = load_models(args)
    if args.drafts is None:
        return target, tok, {"draft": first}
    p = next(target.parameters())
    others = [
        resolve_draft(spec, target, tok, target_name=args.target).to(
            device=p.device, dtype=next(first.parameters()).dtype
        )
        for spec in specs[1:]
    ]
    return target, tok, dict(zip(readout_names(specs), [first, *others]))


def _settings(args, readouts: dict, specs: list, modes: list, controls: list, frame_file: str | None) -> dict:
    """The run's settings as recorded in summary.json."""
    return {
        "target": args.target,
        "drafts": {k: (spec or "shipped") for k, spec in zip(readouts, specs)},
        "dtype": DTYPES[args.dtype],
        "draft_dtype": args.draft_dtype,
        "device": args.device,
        "tasks": task_source(args.tasks),
        "modes": modes,
        "controls": controls,
        "limit": args.limit,
        "solved_from": args.solved_from,
        "reference_from": args.reference_from,
        "answer_frame": args.answer_frame,
        "frame_from": frame_file,
        "margin": args.margin,
        "n_boot": args.n_boot,
        "seed": args.seed,
    }


def cmd_diagnose(args) -> int:
    from pathlib import Path

    from draftguide.experiments.diagnose import compute_solved, results_field, run_diagnose, solved_from
    from draftguide.reporting.tables import diagnose_summary

    modes, controls, specs = _checked_choices(args)
    ttt = ttt_config(args) if args.ttt else None
    tasks = load_task_rows(args)
    refs = (
        {k: v for k, v in results_field(args.reference_from, "response").items() if isinstance(v, str)}
        if args.reference_from
        else None
    )
    solved = solved_from(args.solved_from) if args.solved_from else None
    frame_file = args.frame_from or args.solved_from
    responses = results_field(frame_file, "response") if frame_file and args.answer_frame == "framed" else None
    target, tok, readouts = _load_readouts(args, specs)
    if solved is None and not args.no_solve:
        settings = {"target": args.target, "dtype": DTYPES[args.dtype], "tasks": task_source(args.tasks)}
        solved, folder = compute_solved(target, tok, tasks, Path(args.out), args.solve_max_new_tokens, settings)
        if responses is None and args.answer_frame == "framed" and (folder / "results.jsonl").is_file():
            responses = results_field(folder / "results.jsonl", "response")
    s = run_diagnose(
        target,
        tok,
        readouts,
        tasks,
        args.out,
        modes=modes,
        controls=controls,
        references=refs,
        solved=solved,
        responses=responses,
        frame=args.answer_frame,
        margin=args.margin,
        command=args.command,
        argv=args.argv,
        n_boot=args.n_boot,
        seed=args.seed,
        ttt=ttt,
        **({"lead": args.frame_lead} if args.frame_lead is not None else {}),
        settings=_settings(args, readouts, specs, modes, controls, frame_file),
    )
    print_table(
        diagnose_summary(s, args.answer_frame, ttt=ttt is not None),
        f"{args.out}/tokens.jsonl, summary.json, report.md and figures",
    )
    return 0
