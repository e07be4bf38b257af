"""Training commands: `make-data` (training samples), `train-draft` (a DFlash draft or aligned readout,
torchrun-ready) and `ttt-tau` (acceptance length before/after test-time training on the context)."""

from __future__ import annotations

import os

from draftguide.app.cli.common import (
    add_target_args,
    load_models,
    load_target_from_args,
    print_table,
    resolve_device,
    with_template,
)
from draftguide.app.cli.options import add_ttt_args, ttt_config
from draftguide.errors import DraftGuideError


# -- make-data -------------------------------------------------------------------------------------------------
def add_make_data_parser(sub) -> None:
    p = sub.add_parser("make-data", help="target-generated responses to prompts, for draft training (resumable)")
    add_target_args(p, device="cpu")
    p.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        help="sources: sharegpt, gsm[:N], or JSONL files (mtbench/humaneval are held out)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=None, help="prompts per source")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-held-out", action="store_true", help="permit mtbench/humaneval as training prompts")
    p.add_argument(
        "--responses",
        default="target",
        choices=["target", "given"],
        help="target: generate the target's own responses; given: tokenize the rows' own last assistant "
        "turn or raw 'text' (no generation; e.g. --prompts sharegpt-chat, for --loss kd)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=1024, help="with --responses given: cut samples to this many tokens"
    )
    p.set_defaults(func=cmd_make_data)


def cmd_make_data(args) -> int:
    from draftguide.modeling.sampling import check_sampling
    from draftguide.training.data import make_data
    from draftguide.training.datasources import HELD_OUT, load_source

    check_sampling(args.temperature)
    held = [s for s in args.prompts if s.partition(":")[0] in HELD_OUT]
    if held and not args.allow_held_out:
        raise DraftGuideError(
            f"{held} are held-out benchmark sets for measuring tau; pass --allow-held-out to train on them anyway"
        )
    prompts = [r for s in args.prompts for r in load_source(s, limit=args.limit, seed=args.seed)]
    if args.responses == "given":
        meta = _given_responses(args, prompts)
    else:
        target, tok = load_target_from_args(args, args.device)
        meta = make_data(
            target,
            tok,
            prompts,
            args.out,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            max_prompt_tokens=args.max_prompt_tokens,
            seed=args.seed,
        )
    print(f"{meta['n_samples']} samples, {meta['n_response_tokens']} response tokens in {args.out}")
    return 0


def _given_responses(args, prompts: list[dict]) -> dict:
    """--responses given: the rows' own responses tokenized (only the tokenizer loads). Returns the data's meta."""
    from transformers import AutoTokenizer

    from draftguide.modeling.targets import resolve_target
    from draftguide.training.data import make_text_data

    tok = with_template(args, AutoTokenizer.from_pretrained(resolve_target(args.target)))
    return make_text_data(tok, prompts, args.out, max_tokens=args.max_tokens)


# -- train-draft -----------------------------------------------------------------------------------------------
def add_train_draft_parser(sub) -> None:
    p = sub.add_parser(
        "train-draft", help="train a DFlash draft for a target on make-data samples (resumable, torchrun-ready)"
    )
    add_target_args(p, device=None)
    p.add_argument("--data", required=True, help="folder written by make-data")
    p.add_argument("--out", required=True)
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None)
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--block-size", type=int, default=None, help="default 16, or the --init-from draft's")
    p.add_argument("--anchors-per-seq", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=768)
    _add_schedule_args(p)
    _add_objective_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train_draft)


def _add_schedule_args(p) -> None:
    """train-draft: length, learning rate, checkpoints and wall-time limits."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.04)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--vocab-subset",
        type=int,
        default=16384,
        help="loss over the N most frequent response tokens (0 = full vocabulary)",
    )
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--no-normalize-features", action="store_true", help="feed raw target features to fc while training")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long; --resume continues"
    )
    p.add_argument(
        "--time-budget-minutes",
        type=float,
        default=None,
        help="fit the whole schedule (warmup + cosine to 0) into this much wall time: total steps are re-planned from "
        "the speed of the first steps",
    )
    p.add_argument("--no-tf32", action="store_true", help="exact fp32 matmuls on CUDA while training (default: TF32)")


def _add_objective_args(p) -> None:
    """train-draft: the loss, the kind of readout trained, its starting point and which positions train."""
    p.add_argument(
        "--loss",
        default="ce",
        choices=["ce", "kd", "mix"],
        help="ce: the text's tokens; kd: distill the target's next-token distribution; mix: both (default ce)",
    )
    p.add_argument("--kd-weight", type=float, default=0.5, help="share of the KD term with --loss mix (default 0.5)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument(
        "--context-includes-anchor",
        action="store_true",
        help="train an aligned readout: blocks see the anchor's own target features (cannot speculate)",
    )
    p.add_argument("--init-from", default=None, help="start from this draft folder (its shape; e.g. the shipped draft)")
    p.add_argument(
        "--autocast", action="store_true", help="bf16 autocast of the target and draft forwards (fast on CPUs with AMX)"
    )
    p.add_argument("--train-offsets", type=int, default=None, help="train block offsets 1..N only (default all)")
    p.add_argument(
        "--no-first-token",
        action="store_true",
        help="anchors only inside the response (the first response token is no label)",
    )


def _train_config(args):
    """The validated `TrainConfig` of train-draft's flags."""
    from draftguide.modeling.draft_io import draft_path
    from draftguide.training.train import TrainConfig

    return TrainConfig(
        block_size=args.block_size,
        draft_layers=args.draft_layers,
        target_layer_ids=args.target_layer_ids,
        anchors_per_seq=args.anchors_per_seq,
        batch_size=args.batch_size,
        max_len=args.max_len,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        grad_clip=args.grad_clip,
        vocab_subset=args.vocab_subset or None,
        mask_token_id=args.mask_token_id,
        normalize_features=not args.no_normalize_features,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        time_budget_s=args.time_budget_minutes * 60 if args.time_budget_minutes else None,
        tf32=not args.no_tf32,
        loss=args.loss,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        context_includes_anchor=args.context_includes_anchor,
        init_from=args.init_from and str(draft_path(args.init_from)),
        autocast=args.autocast,
        first_token=not args.no_first_token,
        train_offsets=args.train_offsets,
    ).validate()


def cmd_train_draft(args) -> int:
    from draftguide.training.train import train_draft

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args, per_rank=True)
    if world > 1:  # under torchrun: one process per device
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    cfg = _train_config(args)
    try:
        target, tok = load_target_from_args(args, device)
        res = train_draft(
            target,
            tok,
            args.data,
            args.out,
            cfg,
            resume=args.resume,
            max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        )
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if res["finished"] else "stopped early (resume with --resume)"
        print(
            f"{state} at step {res['step']}/{res['total_steps']} after {res['elapsed_s']:.0f}s; draft in {res['draft']}"
        )
    return 0


# -- ttt-tau ---------------------------------------------------------------------------------------------------
def add_ttt_tau_parser(sub) -> None:
    p = sub.add_parser(
        "ttt-tau", help="acceptance length before/after test-time training on the context, with delta-tau CIs"
    )
    add_target_args(p, device="cpu", draft=True)
    p.add_argument(
        "--sets",
        default="suite,suite-doc,builtin",
        help="comma list of suite (chat prompts of the built-in tasks), suite-doc (their documents, first part), "
        "builtin, mtbench, humaneval, sharegpt-heldout or JSONL prompt files",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=8, help="contexts per set (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--context-tokens", type=int, default=256, help="suite-doc: tokens of each document kept as context")
    p.add_argument("--seed", type=int, default=0)
    add_ttt_args(p)
    p.set_defaults(func=cmd_ttt_tau)


def cmd_ttt_tau(args) -> int:
    from draftguide.experiments.ttt_measure import parse_sets, run_ttt_tau, tau_table

    ttt = ttt_config(args)
    sets = parse_sets(args.sets)
    if args.max_new_tokens < 2 or (args.limit is not None and args.limit < 1) or args.context_tokens < 3:
        raise DraftGuideError("--max-new-tokens must be >= 2, --limit >= 1 and --context-tokens >= 3")
    target, tok, draft = load_models(args)
    s = run_ttt_tau(
        target,
        tok,
        draft,
        sets,
        args.out,
        ttt,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        context_tokens=args.context_tokens,
        command=args.command,
    )
    print_table(tau_table(s), f"{args.out}/results.jsonl and {args.out}/summary.json")
    return 0
