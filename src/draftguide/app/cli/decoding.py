"""Decoding commands: `speculate` and `bench-tau` (lossless speculative decoding, timed), `generate` (stream a
draft-guided answer) and `serve` (the OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import sys

from draftguide.app.cli.common import (
    add_target_args,
    comma_list,
    default_draft,
    load_models,
    print_table,
)
from draftguide.app.cli.options import add_guided_ttt_args, add_method_args, add_ttt_args, guided_ttt, ttt_config
from draftguide.errors import DraftGuideError

VERIFY_HELP = (
    "drafted tokens verified per step: N, 'auto' (adaptive, from measured cost curves) or 'full' (the whole "
    "block); default: auto on a CPU, full on a GPU"
)


def _verify_len(text: str):
    if text in ("auto", "full"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer, 'auto' or 'full'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, 'auto' or 'full'")
    return n


def _add_draft_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="FR-Spec: the draft proposes from the N most frequent tokens (its folder's vocab_ranking); "
        "the target verifies as usual, so output is unchanged. 0: the full head. Default: 8192 on a CPU when "
        "the draft ships a ranking, else the full head",
    )


def _speculation_defaults(args):
    """The device's defaults for what `--draft-vocab` and `--draft-dtype` leave open (measured in
    benchmarks/bench_frspec.py: on this CPU the 8K head with a bf16 draft is 1.20x the fp32 full head); returns
    the FR-Spec token ids or None for the full head."""
    from draftguide.app.cli.common import torch_dtype
    from draftguide.decode.speculative import default_draft_dtype, default_draft_vocab, load_draft_vocab
    from draftguide.modeling.draft_io import draft_path

    if args.draft_vocab is not None and args.draft_vocab < 0:
        raise DraftGuideError(f"--draft-vocab must be >= 0 (0: the full head), got {args.draft_vocab}")
    if args.draft_dtype is None:
        args.draft_dtype = str(default_draft_dtype(args.device, torch_dtype(args.dtype))).removeprefix("torch.")
    folder = args.draft  # set by `default_draft`
    if folder is None or not (folder.startswith("init") or draft_path(folder).exists()):
        return None  # no draft to read: loading the pair reports the missing target or draft in one line
    size = default_draft_vocab(args.device, folder) if args.draft_vocab is None else args.draft_vocab
    return load_draft_vocab(folder, size) if size else None


# -- speculate -------------------------------------------------------------------------------------------------
def add_speculate_parser(sub) -> None:
    p = sub.add_parser(
        "speculate", help="lossless speculative decoding with a DFlash draft, timed against plain greedy"
    )
    add_target_args(p, device="cpu", draft=True)
    p.add_argument("--prompts", default="builtin", help="JSONL with 'messages' or 'prompt' per row, or 'builtin'")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--verify-len", type=_verify_len, default=None, help=VERIFY_HELP)
    _add_draft_vocab(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed (default: fresh randomness; the seed used is in summary.json)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-greedy timing runs")
    p.set_defaults(func=cmd_speculate)


def cmd_speculate(args) -> int:
    from draftguide.experiments.speculate import run_speculate
    from draftguide.modeling.prompts import load_prompts
    from draftguide.modeling.sampling import check_sampling, resolve_seed
    from draftguide.reporting.tables import speculate_table

    check_sampling(args.temperature, args.top_p, args.top_k)  # fail before loading any model
    if args.seed is not None:
        resolve_seed(args.seed)
    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts = load_prompts(args.prompts)[: args.limit]
    default_draft(args, "speculative")
    vocab = _speculation_defaults(args)
    target, tok, draft = load_models(args)
    s = run_speculate(
        target,
        tok,
        draft,
        prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        verify_len=args.verify_len,
        seed=args.seed,
        baseline=not args.no_baseline,
        draft_vocab=vocab,
    )
    print_table(
        speculate_table(s, baseline=not args.no_baseline), f"{args.out}/results.jsonl and {args.out}/summary.json"
    )
    return 0


# -- bench-tau -------------------------------------------------------------------------------------------------
BENCH_TAU_KEYS = (
    "n_prompts",
    "tau",
    "tau_ci95_over_prompts",
    "verify_len",
    "draft_vocab",
    "draft_dtype",
    "acceptance_histogram",
    "tokens_per_s",
    "baseline_method",
    "baseline_tokens_per_s",
    "speedup",
    "hf_generate_tokens_per_s",
    "speedup_vs_hf_generate",
    "lossless",
)  # the fields of each set's run kept in bench-tau's summary.json


def add_bench_tau_parser(sub) -> None:
    p = sub.add_parser("bench-tau", help="tau and speedup per held-out benchmark set (T=0), JSON + table")
    add_target_args(p, device="cpu", draft=True)
    p.add_argument(
        "--sets", default="mtbench,humaneval", help="comma list of mtbench, humaneval, sharegpt-heldout or JSONL files"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--verify-len", type=_verify_len, default=None, help=VERIFY_HELP)
    _add_draft_vocab(p)
    p.set_defaults(func=cmd_bench_tau)


def cmd_bench_tau(args) -> int:
    from pathlib import Path

    from draftguide.experiments.speculate import run_speculate
    from draftguide.reporting.runs import environment, write_json
    from draftguide.reporting.tables import bench_tau_table
    from draftguide.training.datasources import load_source

    prompt_sets = {s: load_source(s, limit=args.limit) for s in comma_list(args.sets)}  # fail before loading models
    default_draft(args, "speculative")
    vocab = _speculation_defaults(args)
    target, tok, draft = load_models(args)
    out, res = Path(args.out), {}
    for name, prompts in prompt_sets.items():
        tag = Path(name).stem if name.endswith(".jsonl") else name
        res[tag] = run_speculate(
            target,
            tok,
            draft,
            prompts,
            out / tag,
            max_new_tokens=args.max_new_tokens,
            verify_len=args.verify_len,
            draft_vocab=vocab,
        )
    summary = {
        "target": args.target,
        "draft": args.draft or "shipped",
        "max_new_tokens": args.max_new_tokens,
        "sets": {k: {f: v.get(f) for f in BENCH_TAU_KEYS} for k, v in res.items()},
        "environment": environment(),
    }
    write_json(out / "summary.json", summary)
    print_table(bench_tau_table(res))
    return 0


# -- generate --------------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a (draft-guided) answer to a prompt to the terminal")
    add_target_args(p, device="cpu", draft=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="continue the text as is (no chat template)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--verify-len",
        type=int,
        default=None,
        help="with --speculative: drafted tokens verified per step (default block_size-1; 1-2 is fastest on a CPU)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    add_method_args(p, baselines=False)
    add_guided_ttt_args(p)
    p.set_defaults(func=cmd_generate)


def _generate_kwargs(args) -> dict:
    """`DraftGuide.generate` keyword arguments of the flags, checked (before the models load)."""
    from draftguide.app.pipeline import check_generate
    from draftguide.modeling.sampling import effective_temperature

    opts = {
        k: v
        for k, v in dict(
            beta_schedule=args.beta_schedule, mix=args.mix, guard_top_k=args.guard_top_k, verify_len=args.verify_len
        ).items()
        if v is not None
    }
    if args.verify_len is not None and not args.speculative:
        raise DraftGuideError("--verify-len needs --speculative")
    kw = dict(
        method="guided",
        beta=0.0 if args.beta is None else args.beta,
        speculative=args.speculative,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        **opts,
    )
    check_generate(**kw)
    if args.speculative and effective_temperature(args.temperature) > 0:
        raise DraftGuideError("--speculative is exact for greedy decoding only: use --temperature 0")
    return kw


def cmd_generate(args) -> int:
    from draftguide.app.pipeline import DraftGuide
    from draftguide.modeling.sampling import effective_temperature
    from draftguide.reporting.runs import fmt

    kw = _generate_kwargs(args)
    default_draft(args, "speculative" if args.speculative else "guidance")
    dg = DraftGuide(*load_models(args), name=args.target)
    prompt = {"prompt": args.prompt} if args.raw else args.prompt  # a plain string takes the chat template if any

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    g = dg.generate(prompt, seed=args.seed, ttt=guided_ttt(args), on_text=show, **kw)
    if g.ttt:
        r = g.ttt
        print(
            f"\n[TTT on the prompt: {r['steps']} steps in {r['seconds']:.1f}s, context loss {r['loss_before']:.3f} -> "
            f"{r['loss_after']:.3f}]",
            file=sys.stderr,
        )
    sampled = effective_temperature(args.temperature) > 0
    print(
        f"\n[{len(g.tokens)} tokens in {g.stats['seconds']:.1f}s ({fmt(g.stats['tokens_per_s'], '.1f')} tok/s), beta "
        f"{kw['beta']:g}, "
        f"{'seed ' + str(g.seed) + ', ' if sampled else ''}"
        f"{g.stats.get('n_flips', 0)} tokens flipped by guidance]",
        file=sys.stderr,
    )
    return 0


# -- serve -----------------------------------------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models)")
    add_target_args(p, device=None, draft=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id reported and accepted (default: the --target value)")
    p.add_argument("--max-pending", type=int, default=64, help="requests allowed to wait for the model; more get 503")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests waiting together are decoded together, up to this many (1: one at a time; default 8)",
    )
    g = p.add_argument_group("defaults for requests that do not set them (clients that send only model and messages)")
    g.add_argument("--method", default=None, choices=["greedy", "speculative", "guided"])
    g.add_argument("--beta", type=float, default=0.0, help="guidance weight (implies method guided)")
    g.add_argument("--speculative", action="store_true", help="speculative greedy, or exact speculative guided greedy")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument(
        "--ttt", action="store_true", help="adapt the draft on every request's prompt (--ttt-* options), then reset"
    )
    add_ttt_args(g)
    p.set_defaults(func=cmd_serve)


def _serve_draft_purpose(args) -> str:
    """One draft serves every request: the speculative draft by default (speculative requests need it); an
    aligned readout (the guidance default) only when the defaults guide and do not speculate."""
    if args.speculative or args.method == "speculative":
        return "speculative"
    return "guidance" if args.beta or args.method == "guided" else "speculative"


def cmd_serve(args) -> int:
    from draftguide.app.pipeline import DraftGuide, resolve_method
    from draftguide.app.server import serve

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DraftGuideError(
            f"serve needs fastapi and uvicorn ({e.name} is missing): pip install fastapi uvicorn"
        ) from e
    resolve_method(args.method, args.beta, args.speculative)  # before the models load
    # an aligned readout given with --draft guides token by token and refuses speculative requests
    default_draft(args, _serve_draft_purpose(args))
    if args.max_tokens < 1:
        raise DraftGuideError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_batch < 1:
        raise DraftGuideError(f"--max-batch must be >= 1, got {args.max_batch}")
    defaults = {
        "method": args.method,
        "beta": args.beta,
        "speculative": args.speculative,
        "max_new_tokens": args.max_tokens,
        "ttt": ttt_config(args, seed=0).kwargs() if args.ttt else None,
    }
    dg = DraftGuide(*load_models(args), name=args.model_name or args.target)
    print(
        f"serving {dg.name} on http://{args.host}:{args.port}/v1 (POST /chat/completions, GET /models)", file=sys.stderr
    )
    serve(dg, args.host, args.port, max_pending=args.max_pending, defaults=defaults, max_batch=args.max_batch)
    return 0
