"""Option groups several commands share: the decoding-method flags (eval, sweep beta, generate) and the
test-time-training flags (--ttt-*), with their conversion into library options."""

from __future__ import annotations

import argparse
import sys

from draftguide.app.cli.common import draft_spec, int_list
from draftguide.errors import DraftGuideError

# flag -> (option name, methods it applies to)
GUIDED_METHODS = ("guided", "guided-noise", "guided-shuffle")
METHOD_FLAGS = {
    "beta": ("beta", GUIDED_METHODS),
    "beta_schedule": ("beta_schedule", GUIDED_METHODS),
    "mix": ("mix", GUIDED_METHODS),
    "guard_top_k": ("guard_top_k", GUIDED_METHODS),
    "speculative": ("speculative", GUIDED_METHODS),
    "power_preset": ("preset", ("power",)),
    "alpha": ("alpha", ("power",)),
    "mcmc_steps": ("mcmc_steps", ("power",)),
    "block_num": ("block_num", ("power",)),
    "dola_layers": ("candidate_layers", ("dola",)),
    "relative_top": ("relative_top", ("dola",)),
    "seed": ("seed", (*GUIDED_METHODS, "power", "sample")),
    "temperature": ("temperature", (*GUIDED_METHODS, "sample")),
    "top_p": ("top_p", (*GUIDED_METHODS, "sample")),
    "top_k": ("top_k", (*GUIDED_METHODS, "sample")),
}


# -- method flags ---------------------------------------------------------------------------------------------
def mix_arg(text: str) -> str:
    """argparse type of --mix: one of the guided mixes (a removed one says what replaced it)."""
    from draftguide.decode.guided import MIXES, REMOVED_MIXES

    if text in REMOVED_MIXES:
        raise argparse.ArgumentTypeError(REMOVED_MIXES[text])
    if text not in MIXES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(MIXES)})")
    return text


def _renamed(replacement: str):
    def refuse(text: str):
        raise argparse.ArgumentTypeError(f"this flag was replaced: use {replacement}")

    return refuse


def _preset_text(name: str) -> str:
    from draftguide.decode.baselines import POWER_PRESETS

    p = POWER_PRESETS[name]
    return f"alpha {p['alpha']:g}, {p['block_num']} blocks, {p['mcmc_steps']} MH steps each"


def add_method_args(p: argparse.ArgumentParser, beta: bool = True, baselines: bool = True) -> None:
    """The draft-guided decoding group (with --beta when `beta`) and, with `baselines`, the Power Sampling /
    DoLa group."""
    _add_guided_args(p, beta)
    if baselines:
        _add_baseline_args(p)


def _add_guided_args(p: argparse.ArgumentParser, beta: bool) -> None:
    g = p.add_argument_group("draft-guided decoding (methods guided, guided-noise)")
    if beta:
        g.add_argument("--beta", type=float, default=None, help="weight of the draft logits, in [0, 1]")
    g.add_argument(
        "--beta-schedule",
        choices=["fixed", "adaptive"],
        default=None,
        help="adaptive: beta * JS(target, draft) / ln 2 per token",
    )
    g.add_argument(
        "--mix",
        type=mix_arg,
        default=None,
        metavar="{logits,probs}",
        help="logits: (1-beta) target + beta draft logits (default); probs: (1-beta) p_target + beta p_draft",
    )
    g.add_argument("--guard-top-k", type=int, default=None, help="guidance only re-ranks the target's top-k tokens")
    g.add_argument(
        "--speculative", action="store_true", help="exact speculative guided greedy (same tokens, fewer target passes)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed of the noise control / Power Sampling / sampling")


def _add_baseline_args(p: argparse.ArgumentParser) -> None:
    from draftguide.decode.baselines import POWER_PRESETS

    g = p.add_argument_group("baselines (methods power, dola)")
    g.add_argument(
        "--power-preset",
        choices=list(POWER_PRESETS),
        default=None,
        help="Power Sampling settings: paper (the reference's: "
        + _preset_text("paper")
        + "; default) or cpu ("
        + _preset_text("cpu")
        + "); the three flags below override it",
    )
    g.add_argument("--alpha", type=float, default=None, help="Power Sampling exponent (proposal temperature 1/alpha)")
    g.add_argument("--mcmc-steps", type=int, default=None, help="Power Sampling: MH steps after each block")
    g.add_argument("--block-num", type=int, default=None, help="Power Sampling: blocks max_new_tokens is split into")
    g.add_argument(
        "--n-mcmc",
        type=_renamed("--mcmc-steps (MH steps after each block, the reference's name)"),
        default=None,
        help=argparse.SUPPRESS,
    )
    g.add_argument(
        "--power-block-size",
        type=_renamed(
            "--block-num (the number of blocks max_new_tokens is split into, "
            "as in the reference; it was tokens per block)"
        ),
        default=None,
        help=argparse.SUPPRESS,
    )
    g.add_argument(
        "--dola-layers",
        type=int_list,
        default=None,
        help="DoLa candidate layers (hidden-state indices), comma list",
    )
    g.add_argument("--relative-top", type=float, default=None, help="DoLa plausibility filter (default 0.1)")


def flags_for(args, method: str) -> dict:
    """Options of `method` from the flags given for it (a sweep runs several methods: others are ignored)."""
    return {
        name: getattr(args, flag)
        for flag, (name, methods) in METHOD_FLAGS.items()
        if method in methods and _given(args, flag)
    }


def _given(args, flag: str) -> bool:
    v = getattr(args, flag, None)
    return v is not None and v is not False  # 0 and 0.0 are given values


def method_options(args, method: str) -> dict:
    """The options of `method` from the flags given; a flag given for another method is an error."""
    from draftguide.experiments.evaluate import check_method_options

    for flag, (_, methods) in METHOD_FLAGS.items():
        if _given(args, flag) and method not in methods:
            raise DraftGuideError(
                f"--{flag.replace('_', '-')} does not apply to method {method!r} (only {', '.join(methods)})"
            )
    opts = flags_for(args, method)
    if getattr(args, "ttt", False) and method != "guided":
        raise DraftGuideError(f"--ttt does not apply to method {method!r} (only guided)")
    if method in GUIDED_METHODS:
        opts["draft"] = draft_spec(args, "speculative" if args.speculative else "guidance")
    if method == "guided" and args.ttt:
        opts["ttt"] = guided_ttt(args)
    check_method_options(method, opts)
    return opts


# -- test-time training ----------------------------------------------------------------------------------------
def add_ttt_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    """--ttt-* options of test-time training (the draft adapted on each context with LoRA); `grid`: steps, lr
    and rank are swept (comma lists of their own) and only the other options are added."""
    from draftguide.training.ttt import TTTConfig as C  # the defaults live there

    if not grid:
        p.add_argument(
            "--ttt-steps", type=int, default=C.steps, help=f"TTT optimizer steps per context (default {C.steps})"
        )
        p.add_argument("--ttt-lr", type=float, default=C.lr, help=f"TTT learning rate (default {C.lr:g})")
        p.add_argument("--ttt-rank", type=int, default=C.rank, help=f"LoRA rank (default {C.rank})")
    p.add_argument(
        "--ttt-anchors",
        type=int,
        default=C.anchors_per_step,
        help=f"random context anchors per TTT step (default {C.anchors_per_step})",
    )
    p.add_argument("--ttt-modules", default=",".join(C.target_modules), help="comma list of draft modules with LoRA")
    p.add_argument(
        "--ttt-raw-fc",
        action="store_true",
        help="the LoRA adapter on fc reads raw target features (default: standardised per dimension by the context's "
        "RMS)",
    )


def add_guided_ttt_args(p: argparse.ArgumentParser) -> None:
    """--ttt (guided decoding with a draft adapted on each prompt) and its --ttt-* options."""
    p.add_argument(
        "--ttt", action="store_true", help="guided decoding with the draft adapted (TTT) on each prompt first"
    )
    add_ttt_args(p)


def ttt_config(args, **override):
    """The validated `TTTConfig` of the --ttt-* flags (`override`: fields set by the command, e.g. a sweep's
    grid point). Raises DraftGuideError on an invalid setting."""
    from draftguide.training.ttt import TTTConfig

    modules = tuple(m.strip() for m in args.ttt_modules.split(",") if m.strip())
    fields = (
        dict(
            anchors_per_step=args.ttt_anchors,
            target_modules=modules,
            seed=getattr(args, "seed", 0),
            standardize_fc=not args.ttt_raw_fc,
        )
        | override
    )
    if hasattr(args, "ttt_steps"):
        fields = dict(steps=args.ttt_steps, lr=args.ttt_lr, rank=args.ttt_rank) | fields
    return TTTConfig(**fields).validate()


def ttt_kwargs(args, seed: int) -> dict:
    """`ttt_adapt` keyword arguments from --ttt-* with `seed`, JSON-able (they are part of a run's settings)."""
    cfg = ttt_config(args, seed=seed).kwargs()
    return cfg | {"target_modules": list(cfg["target_modules"])}


def guided_ttt(args) -> dict | None:
    """`ttt_kwargs` when --ttt is given (seed: --seed, or 0), else None."""
    if not getattr(args, "ttt", False):
        return None
    return ttt_kwargs(args, args.seed or 0)


def add_batch_arg(p) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="tasks decoded together (greedy, sample, guided, guided-noise; each answer equals its batch-1 "
        "answer); power, dola, guided-shuffle (it reads another task's run) and guided with --speculative/--ttt "
        "run one by one (default 1)",
    )


def batch_size_arg(args, methods) -> int:
    """--batch-size checked; a line on stderr for each selected method that stays batch 1 (`speculative`
    stands for guided decoding with --speculative or TTT)."""
    from draftguide.decode.batched import single_only_note

    n = args.batch_size
    if n < 1:
        raise DraftGuideError(f"--batch-size must be >= 1, got {n}")
    for m in methods:
        note = single_only_note(m, n)
        if note:
            print(note, file=sys.stderr)
    return n
