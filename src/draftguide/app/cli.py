"""`draftguide` command line: a thin layer over the library API."""

from __future__ import annotations

import argparse
import shlex
import sys

from draftguide.errors import DraftGuideError
from draftguide.modeling.targets import DEFAULT_TARGET
from draftguide.reporting.runs import record_command

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


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


VERIFY_HELP = (
    "drafted tokens verified per step: N, 'auto' (adaptive, from measured cost curves) or 'full' (the whole "
    "block); default: auto on a CPU, full on a GPU"
)


def _add_draft_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="FR-Spec: the draft proposes from the N most frequent tokens (its folder's vocab_ranking); "
        "the target verifies as usual, so output is unchanged",
    )


def _draft_vocab(args):
    if args.draft_vocab is None:
        return None
    from draftguide.decode.speculative import load_draft_vocab

    return load_draft_vocab(_draft_spec(args), args.draft_vocab)


def _add_target_args(
    p: argparse.ArgumentParser, device: str | None = None, draft: bool = False, draft_dtype: bool = True
) -> None:
    """--target, --dtype, --device (None: cuda:LOCAL_RANK when a GPU is there, else cpu), and --draft (with
    --draft-dtype for commands that load the pair through `load_models`)."""
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"alias, local HF folder or hub id (default {DEFAULT_TARGET})"
    )
    if draft:
        p.add_argument(
            "--draft",
            default=None,
            help="DFlash draft folder, or 'init[:LAYERS]' for an untrained draft (default: the shipped draft of the "
            "target)",
        )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    if draft and draft_dtype:
        p.add_argument(
            "--draft-dtype",
            default=None,
            choices=sorted(DTYPES),
            help="the draft's dtype (default: the target's); bfloat16 speeds up a draft next to an fp32 CPU target",
        )
    p.add_argument(
        "--device", default=device, help="default: cuda:LOCAL_RANK if available, else cpu" if device is None else None
    )
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        type=_template_kwargs_arg,
        metavar="JSON",
        help="extra chat-template variables wherever a chat template is applied, e.g. "
        "'{\"enable_thinking\": false}' for Qwen3 (the vLLM/SGLang flag)",
    )


def _add_batch_arg(p) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="tasks decoded together (greedy, sample, guided, guided-noise; each answer equals its batch-1 "
        "answer); power, dola and guided with --speculative/--ttt run one by one (default 1)",
    )


def _batch_size(args, methods) -> int:
    """--batch-size checked; a line on stderr for each selected method that stays batch 1."""
    from draftguide.decode.batched import single_only_note

    n = args.batch_size
    if n < 1:
        raise DraftGuideError(f"--batch-size must be >= 1, got {n}")
    for m in methods:
        note = single_only_note(m, n)
        if note:
            print(note, file=sys.stderr)
    return n


def _template_kwargs_arg(text: str) -> dict:
    from draftguide.modeling.prompts import check_chat_template_kwargs

    try:
        return check_chat_template_kwargs(text)
    except DraftGuideError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _with_template(args, tok):
    """The tokenizer with --chat-template-kwargs applied to every later chat template."""
    from draftguide.modeling.prompts import set_chat_template_kwargs

    set_chat_template_kwargs(tok, getattr(args, "chat_template_kwargs", None))
    return tok


def _add_ttt_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
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


def _ttt_config(args, **override):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "speculate", help="lossless speculative decoding with a DFlash draft, timed against plain greedy"
    )
    _add_target_args(p, device="cpu", draft=True)
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

    p = sub.add_parser("make-data", help="target-generated responses to prompts, for draft training (resumable)")
    _add_target_args(p, device="cpu")
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

    p = sub.add_parser(
        "train-draft", help="train a DFlash draft for a target on make-data samples (resumable, torchrun-ready)"
    )
    _add_target_args(p, device=None)
    p.add_argument("--data", required=True, help="folder written by make-data")
    p.add_argument("--out", required=True)
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None)
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--block-size", type=int, default=None, help="default 16, or the --init-from draft's")
    p.add_argument("--anchors-per-seq", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=768)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train_draft)

    p = sub.add_parser(
        "fidelity", help="readout fidelity per block offset (agreement, KL, log p) vs a shuffled-feature null"
    )
    _add_target_args(p, device="cpu")
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

    p = sub.add_parser("bench-tau", help="tau and speedup per held-out benchmark set (T=0), JSON + table")
    _add_target_args(p, device="cpu", draft=True)
    p.add_argument(
        "--sets", default="mtbench,humaneval", help="comma list of mtbench, humaneval, sharegpt-heldout or JSONL files"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--verify-len", type=_verify_len, default=None, help=VERIFY_HELP)
    _add_draft_vocab(p)
    p.set_defaults(func=cmd_bench_tau)

    p = sub.add_parser("tasks", help="the built-in context-learning task suite")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    b = tsub.add_parser("build", help="generate tasks (CL-bench rows with reference answers and checks) as JSONL")
    b.add_argument("--out", required=True, help="FILE.jsonl")
    b.add_argument("--n-per-subcategory", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_tasks_build, run_folder=False)  # --out is a file

    p = sub.add_parser(
        "eval", help="context-learning evaluation: generate, score, summarise (resumable, torchrun-ready)"
    )
    p.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows, or 'builtin' (the shipped suite)")
    p.add_argument("--out", required=True)
    _add_target_args(p, device=None, draft=True, draft_dtype=False)
    p.add_argument(
        "--method", default="greedy", help="greedy, sample, guided, guided-noise, guided-shuffle, power or dola"
    )
    _add_method_args(p)
    g = p.add_argument_group("sampling (methods sample, guided, guided-noise; default greedy, sample: 1.0)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    _add_guided_ttt_args(p)
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
    _add_batch_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "ablate-layers",
        help="layer ablation: one aligned readout per set of target layers (same data, seed and "
        "budget), each measured by fidelity and the diagnostic; table + figure",
    )
    _add_target_args(p, device=None)
    p.add_argument("--data", required=True, help="make-data folder: the training samples of every set")
    p.add_argument(
        "--layer-sets",
        default=None,
        help="';'-separated comma lists of target layer ids (default for a 30-layer "
        "target: '1,8,14,20,27;1,4,7,10,13;17,20,23,26,27;27;14')",
    )
    p.add_argument("--out", required=True)
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
    p.add_argument("--vocab-subset", type=int, default=16384, help="0 = full vocabulary")
    p.add_argument("--autocast", action="store_true")
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10)
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
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_ablate_layers)

    p = sub.add_parser(
        "probe",
        help="linear probes at the answer position: do the target's last state, the draft's final state "
        "and each selected target layer tell the reference answer from the distractor?",
    )
    _add_target_args(p, device="cpu", draft=True)
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

    p = sub.add_parser(
        "diagnose",
        help="readout diagnostic: gold-token rank and log p under the target and deep readouts (teacher forcing), with "
        "null controls and a verdict",
    )
    _add_target_args(p, device="cpu", draft=True)
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
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ttt",
        action="store_true",
        help="also score the (first) draft adapted (TTT) on each task's context, beside the base draft",
    )
    _add_ttt_args(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "profile", help="compute budget: prefill vs context, draft, speculative, TTT and guided costs, decode bandwidth"
    )
    _add_target_args(p, device="cpu", draft=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--context-lens", type=_int_list, default="256,512,1024,2048,4096", help="comma list of prefill context lengths"
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

    p = sub.add_parser(
        "report", help="one paper-style markdown over diagnose/eval/speculate/bench-tau/profile/... run folders"
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (unknown ones are skipped with a warning)")
    p.add_argument("--out", required=True, help="folder for report.md and its figures")
    p.set_defaults(func=cmd_report, run_folder=False)

    p = sub.add_parser("serve", help="OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models)")
    _add_target_args(p, device=None, draft=True)
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
    _add_ttt_args(g)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "ttt-tau", help="acceptance length before/after test-time training on the context, with delta-tau CIs"
    )
    _add_target_args(p, device="cpu", draft=True)
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
    _add_ttt_args(p)
    p.set_defaults(func=cmd_ttt_tau)

    sweep = sub.add_parser("sweep", help="parameter sweeps with tables and figures")
    sweep_sub = sweep.add_subparsers(dest="sweep_kind", required=True)
    p = sweep_sub.add_parser("ttt", help="TTT: context loss, readout log-prob gap and tau versus steps, lr and rank")
    _add_target_args(p, device="cpu", draft=True)
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
    _add_ttt_args(p, grid=True)
    p.set_defaults(func=cmd_sweep_ttt)

    b = sweep_sub.add_parser(
        "beta",
        help="solve rate vs beta for draft-guided decoding, its noise control and baselines (PNG, JSON, markdown)",
    )
    b.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows with checks, or 'builtin'")
    b.add_argument("--out", required=True)
    _add_target_args(b, device=None, draft=True, draft_dtype=False)
    b.add_argument("--betas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma list in [0, 1]")
    b.add_argument(
        "--baselines", default="greedy,power,dola", help="comma list of greedy, power, dola, sample ('' for none)"
    )
    b.add_argument("--no-noise", action="store_true", help="skip the noise control")
    b.add_argument("--max-new-tokens", type=int, default=48)
    b.add_argument("--limit", type=int, default=None, help="the first N tasks")
    _add_method_args(b, beta=False)
    _add_guided_ttt_args(b)
    _add_batch_arg(b)
    b.set_defaults(func=cmd_sweep_beta)

    p = sub.add_parser(
        "matrix",
        help="the research plan's decision matrix on one task set: greedy, sampling, guided per readout "
        "and beta, TTT + guided, noise and shuffled-readout nulls, Power Sampling, DoLa, adaptive beta",
    )
    p.add_argument("--tasks", default="builtin", help="JSONL of CL-bench rows with checks, or 'builtin'")
    p.add_argument("--out", required=True)
    _add_target_args(p, device=None)
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
        "--mix", type=_mix, default=None, metavar="{logits,probs}", help="the mix of every guided row (default logits)"
    )
    p.add_argument(
        "--guard-top-k", type=int, default=None, help="every guided row only re-ranks the target's top-k tokens"
    )
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    _add_ttt_args(p)
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("generate", help="stream a (draft-guided) answer to a prompt to the terminal")
    _add_target_args(p, device="cpu", draft=True)
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
    _add_method_args(p, baselines=False)
    _add_guided_ttt_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


# -- method options (eval, sweep, generate) ------------------------------------------------------------
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a comma list of integers") from None


def _renamed(replacement: str):
    def refuse(text: str):
        raise argparse.ArgumentTypeError(f"this flag was replaced: use {replacement}")

    return refuse


def _preset_text(name: str) -> str:
    from draftguide.decode.baselines import POWER_PRESETS

    p = POWER_PRESETS[name]
    return f"alpha {p['alpha']:g}, {p['block_num']} blocks, {p['mcmc_steps']} MH steps each"


def _mix(text: str) -> str:
    from draftguide.decode.guided import MIXES, REMOVED_MIXES

    if text in REMOVED_MIXES:
        raise argparse.ArgumentTypeError(REMOVED_MIXES[text])
    if text not in MIXES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(MIXES)})")
    return text


def _add_method_args(p: argparse.ArgumentParser, beta: bool = True, baselines: bool = True) -> None:
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
        type=_mix,
        default=None,
        metavar="{logits,probs}",
        help="logits: (1-beta) target + beta draft logits (default); probs: (1-beta) p_target + beta p_draft",
    )
    g.add_argument("--guard-top-k", type=int, default=None, help="guidance only re-ranks the target's top-k tokens")
    g.add_argument(
        "--speculative", action="store_true", help="exact speculative guided greedy (same tokens, fewer target passes)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed of the noise control / Power Sampling / sampling")
    if baselines:
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
        g.add_argument(
            "--alpha", type=float, default=None, help="Power Sampling exponent (proposal temperature 1/alpha)"
        )
        g.add_argument("--mcmc-steps", type=int, default=None, help="Power Sampling: MH steps after each block")
        g.add_argument(
            "--block-num", type=int, default=None, help="Power Sampling: blocks max_new_tokens is split into"
        )
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
            type=_int_list,
            default=None,
            help="DoLa candidate layers (hidden-state indices), comma list",
        )
        g.add_argument("--relative-top", type=float, default=None, help="DoLa plausibility filter (default 0.1)")


def _add_guided_ttt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ttt", action="store_true", help="guided decoding with the draft adapted (TTT) on each prompt first"
    )
    _add_ttt_args(p)


def _guided_ttt(args) -> dict | None:
    """`ttt_adapt` keyword arguments from --ttt-* (JSON-able: they are part of a run's settings), or None."""
    if not getattr(args, "ttt", False):
        return None
    cfg = _ttt_config(args, seed=args.seed or 0).kwargs()
    return cfg | {"target_modules": list(cfg["target_modules"])}


def _draft_spec(args, purpose: str = "guidance", spec: str | None = None) -> str:
    """The draft as a JSON-able option: an absolute folder, `init[:N]`, or the target's shipped draft for
    `purpose` (guidance: the aligned readout when shipped, else the speculative draft; speculative: the
    speculative draft). A speculative purpose refuses an aligned readout with one line."""
    from draftguide.modeling.draft_io import check_speculative_spec, draft_path, shipped_draft

    spec = args.draft if spec is None else spec
    if spec is None:
        shipped = shipped_draft(args.target, purpose)
        if shipped is None:
            raise DraftGuideError(f"no shipped draft for target '{args.target}': pass --draft PATH")
        return str(shipped)
    if spec.startswith("init"):
        return spec
    path = draft_path(spec)
    if not path.exists():
        raise DraftGuideError(f"draft folder '{spec}' does not exist")
    if purpose == "speculative":
        check_speculative_spec(spec)
    return str(path.resolve())


def _default_draft(args, purpose: str) -> None:
    """Commands that load the pair through `load_models`: pick the shipped draft for `purpose` when no --draft
    is given (guidance: the aligned readout), and refuse an aligned readout for speculation before loading."""
    from draftguide.modeling.draft_io import check_speculative_spec, shipped_draft

    if args.draft is None:
        shipped = shipped_draft(args.target, purpose)
        args.draft = None if shipped is None else str(shipped)
    elif purpose == "speculative":
        check_speculative_spec(args.draft)


def _flags_for(args, method: str) -> dict:
    """Options of `method` from the flags given for it (a sweep runs several methods: others are ignored)."""
    return {
        name: getattr(args, flag)
        for flag, (name, methods) in METHOD_FLAGS.items()
        if method in methods and _given(args, flag)
    }


def _given(args, flag: str) -> bool:
    v = getattr(args, flag, None)
    return v is not None and v is not False  # 0 and 0.0 are given values


def _method_options(args, method: str) -> dict:
    """The options of `method` from the flags given; a flag given for another method is an error."""
    from draftguide.experiments.evaluate import check_method_options

    for flag, (_, methods) in METHOD_FLAGS.items():
        if _given(args, flag) and method not in methods:
            raise DraftGuideError(
                f"--{flag.replace('_', '-')} does not apply to method {method!r} (only {', '.join(methods)})"
            )
    opts = _flags_for(args, method)
    if getattr(args, "ttt", False) and method != "guided":
        raise DraftGuideError(f"--ttt does not apply to method {method!r} (only guided)")
    if method in GUIDED_METHODS:
        opts["draft"] = _draft_spec(args, "speculative" if args.speculative else "guidance")
    if method == "guided" and args.ttt:
        opts["ttt"] = _guided_ttt(args)
    check_method_options(method, opts)
    return opts


def load_models(args):
    """Target, tokenizer and a draft checked against the target."""
    from draftguide.app.pipeline import load_pair

    draft_dtype = getattr(args, "draft_dtype", None)
    target, tok, draft = load_pair(
        args.target, args.draft, DTYPES[args.dtype], args.device, draft_dtype and DTYPES[draft_dtype]
    )
    return target, _with_template(args, tok), draft


def cmd_speculate(args) -> int:
    from draftguide.experiments.speculate import run_speculate
    from draftguide.modeling.prompts import load_prompts
    from draftguide.modeling.sampling import check_sampling, resolve_seed

    check_sampling(args.temperature, args.top_p, args.top_k)  # fail before loading any model
    if args.seed is not None:
        resolve_seed(args.seed)
    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts = load_prompts(args.prompts)[: args.limit]
    _default_draft(args, "speculative")
    vocab = _draft_vocab(args)
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
    from draftguide.reporting.runs import fmt

    print(f"\n{'prompts':>8} {'tau':>6} {'tok/s':>8} {'base tok/s':>11} {'speedup':>8} {'lossless':>9}")
    print(
        f"{s['n_prompts']:>8} {fmt(s['tau']):>6} {fmt(s['tokens_per_s'], '.1f'):>8} "
        f"{fmt(s.get('baseline_tokens_per_s'), '.1f'):>11} "
        f"{fmt(s.get('speedup')):>8} {str(s.get('lossless')):>9}"
    )
    if s.get("tau_missing"):
        print(f"tau -: {s['tau_missing']}")
    if args.no_baseline:
        print("base tok/s, speedup -: no baseline run (--no-baseline)")
    print(f"wrote {args.out}/results.jsonl and {args.out}/summary.json")
    return 0


def cmd_make_data(args) -> int:
    import torch

    from draftguide.modeling.sampling import check_sampling
    from draftguide.modeling.targets import load_target
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
        from transformers import AutoTokenizer

        from draftguide.modeling.targets import resolve_target
        from draftguide.training.data import make_text_data

        meta = make_text_data(
            _with_template(args, AutoTokenizer.from_pretrained(resolve_target(args.target))),
            prompts,
            args.out,
            max_tokens=args.max_tokens,
        )
        print(f"{meta['n_samples']} samples, {meta['n_response_tokens']} response tokens in {args.out}")
        return 0
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)
    _with_template(args, tok)
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


def cmd_train_draft(args) -> int:
    import os

    import torch

    from draftguide.modeling.draft_io import draft_path
    from draftguide.modeling.targets import load_target
    from draftguide.training.train import TrainConfig, train_draft

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    cfg = TrainConfig(
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
    try:
        target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
        _with_template(args, tok)
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


def cmd_fidelity(args) -> int:
    import torch

    from draftguide.experiments.fidelity import Sample, run_fidelity, samples_from_rows, target_responses
    from draftguide.modeling.draft_io import resolve_draft
    from draftguide.modeling.prompts import read_jsonl
    from draftguide.modeling.targets import load_target
    from draftguide.training.data import encode_conversation, read_samples
    from draftguide.training.datasources import load_source

    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    specs = [s.strip() for s in (args.draft or "").split(",") if s.strip()] or [None]
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)
    _with_template(args, tok)
    readouts = {}
    for name, spec in zip(_readout_names(specs, args.target), specs):
        d = resolve_draft(spec, target, tok, target_name=args.target)
        readouts[name] = d.to(dtype=getattr(torch, DTYPES[args.draft_dtype or args.dtype]))
    if args.data:
        samples = samples_from_rows(read_samples(args.data))[: args.limit]
    elif args.text:
        encoded = [(r, encode_conversation(tok, r)) for r in read_jsonl(args.text)[: args.limit]]
        samples = [Sample(str(r.get("id", i)), e[0], e[1]) for i, (r, e) in enumerate(encoded) if e is not None]
    else:
        prompts = [
            r for src in args.prompts.split(",") if src.strip() for r in load_source(src.strip(), limit=args.limit)
        ]
        samples = target_responses(target, tok, prompts, args.max_new_tokens)
    s = run_fidelity(
        target,
        readouts,
        samples,
        args.out,
        null=not args.no_null,
        n_boot=args.n_boot,
        seed=args.seed,
        command=args.command,
        settings={k: v for k, v in vars(args).items() if k not in ("func", "command")},
    )
    from draftguide.experiments.fidelity import fidelity_table

    print(fidelity_table(s))
    print(f"wrote {args.out}/summary.json, fidelity.md and fidelity.png")
    return 0


def cmd_bench_tau(args) -> int:
    from pathlib import Path

    from draftguide.experiments.speculate import run_speculate
    from draftguide.reporting.runs import environment, write_json
    from draftguide.training.datasources import load_source

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    prompt_sets = {s: load_source(s, limit=args.limit) for s in sets}  # fail on a bad set before loading models
    _default_draft(args, "speculative")
    vocab = _draft_vocab(args)
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
    keys = (
        "n_prompts",
        "tau",
        "tau_ci95_over_prompts",
        "verify_len",
        "draft_vocab",
        "acceptance_histogram",
        "tokens_per_s",
        "baseline_method",
        "baseline_tokens_per_s",
        "speedup",
        "hf_generate_tokens_per_s",
        "speedup_vs_hf_generate",
        "lossless",
    )
    summary = {
        "target": args.target,
        "draft": args.draft or "shipped",
        "max_new_tokens": args.max_new_tokens,
        "sets": {k: {f: v.get(f) for f in keys} for k, v in res.items()},
        "environment": environment(),
    }
    write_json(out / "summary.json", summary)
    print(f"\n{'set':<18} {'n':>4} {'tau':>6} {'tok/s':>7} {'base':>7} {'speedup':>8} {'vs HF':>6} {'lossless':>9}")
    from draftguide.reporting.runs import fmt

    for k, v in res.items():
        print(
            f"{k:<18} {v['n_prompts']:>4} {fmt(v['tau']):>6} {fmt(v['tokens_per_s'], '.1f'):>7} "
            f"{fmt(v['baseline_tokens_per_s'], '.1f'):>7} "
            f"{fmt(v['speedup']):>8} {fmt(v['speedup_vs_hf_generate']):>6} {str(v['lossless']):>9}"
        )
    missing = {k: v["tau_missing"] for k, v in res.items() if v.get("tau_missing")}
    for k, why in missing.items():
        print(f"{k}: tau -: {why}")
    return 0


def cmd_tasks_build(args) -> int:
    from draftguide.experiments.tasks import build_tasks, write_tasks

    rows = build_tasks(args.n_per_subcategory, args.seed)
    print(f"{len(rows)} tasks in {write_tasks(rows, args.out)}")
    return 0


def cmd_eval(args) -> int:
    import os
    from pathlib import Path

    import torch

    from draftguide.experiments.evaluate import check_judge, check_method, format_table, load_tasks, run_eval
    from draftguide.modeling.targets import load_target

    check_method(args.method, args.max_new_tokens)
    opts = _method_options(args, args.method)
    opts = _eval_seed(opts, args.method, args.out)
    tasks, bad = load_tasks(args.tasks, skip_bad=args.skip_bad)
    tasks = tasks[: args.limit]
    judge = None
    if check_judge(tasks, args.judge):
        from draftguide.experiments.judge import LLMJudge, load_prompt

        judge = LLMJudge(
            args.judge_model,
            args.judge_base_url,
            timeout=args.judge_timeout,
            prompt=load_prompt(args.judge_prompt_file),
        )
    single = (
        args.method
        if args.method in ("power", "dola")
        else "speculative"
        if opts.get("speculative") or opts.get("ttt")
        else None
    )
    batch = _batch_size(args, [single] if single else [])  # before the model loads
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
    _with_template(args, tok)
    source = args.tasks if args.tasks == "builtin" else str(Path(args.tasks).resolve())
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
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": source},
        batch_size=batch,
        chat_template_kwargs=args.chat_template_kwargs,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n" + format_table(s))
        print(f"wrote {args.out}/results.jsonl and {args.out}/summary.json")
    return 0


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


def cmd_ablate_layers(args) -> int:
    from pathlib import Path

    import torch

    from draftguide.experiments.ablate import DEFAULT_SETS, parse_layer_sets, run_ablation
    from draftguide.experiments.diagnose import compute_solved, results_field, solved_from
    from draftguide.experiments.diagnostic import CONTROLS
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.fidelity import samples_from_rows, target_responses
    from draftguide.modeling.targets import load_target
    from draftguide.training.data import read_samples
    from draftguide.training.train import TrainConfig

    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    if any(c not in CONTROLS for c in controls):
        raise DraftGuideError(f"--controls {args.controls!r}: expected a comma list of {', '.join(CONTROLS)}")
    if args.steps is not None and args.steps < 1 or args.budget_minutes is not None and args.budget_minutes <= 0:
        raise DraftGuideError("--steps and --budget-minutes must be positive")
    cfg = TrainConfig(
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
    if not Path(args.data).is_dir():
        raise DraftGuideError(f"--data '{args.data}' is not a folder (make-data output)")
    tasks = [] if args.tasks == "none" else load_tasks(args.tasks)[0][: args.limit]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
    n_layers = target.config.get_text_config().num_hidden_layers
    sets = parse_layer_sets(args.layer_sets or DEFAULT_SETS, n_layers)
    solved = solved_from(args.solved_from) if args.solved_from else None
    responses = results_field(args.solved_from, "response") if args.solved_from else None
    out = Path(args.out)
    if tasks and solved is None and not args.no_solve:
        solved, folder = compute_solved(
            target,
            tok,
            tasks,
            out,
            args.solve_max_new_tokens,
            {"target": args.target, "dtype": DTYPES[args.dtype], "tasks": args.tasks},
        )
        if (folder / "results.jsonl").is_file():
            responses = results_field(folder / "results.jsonl", "response")
    samples = None
    if args.fidelity_limit:
        if args.fidelity_data:
            samples = samples_from_rows(read_samples(args.fidelity_data))[: args.fidelity_limit]
        else:
            prompts = tasks[: args.fidelity_limit] or load_tasks("builtin")[0][: args.fidelity_limit]
            samples = target_responses(target, tok, prompts, args.fidelity_max_new_tokens)
    s = run_ablation(
        target,
        tok,
        args.data,
        tasks,
        out,
        sets,
        cfg,
        fidelity_samples=samples,
        solved=solved,
        responses=responses,
        frame="framed" if responses else "bare",
        controls=controls,
        n_boot=args.n_boot,
        seed=args.seed,
        command=args.command,
    )
    print()
    print(ablation_lines(s))
    print(f"wrote {out}/summary.json, ablation.md and ablation.png")
    return 0


def ablation_lines(s: dict) -> str:
    rows = [
        f"{'set':<22} {'steps':>9} {'loss':>7} {'fid k=1':>8} {'null':>6} {'verdict':>13} {'dlogp all':>10} "
        f"{'failed':>8}"
    ]
    for r in s["rows"]:
        f, d = r.get("fidelity") or {}, r.get("diagnostic") or {}
        num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append(
            f"{r['set']:<22} {str(r['steps']) + '/' + str(r['total_steps']):>9} {num(r['final_loss']):>7} "
            f"{num(f.get('top1_agreement_k1')):>8} {num(f.get('null_top1_agreement_k1')):>6} "
            f"{d.get('verdict', '-'):>13} "
            f"{num((d.get('all') or {}).get('mean')):>10} {num((d.get('failed') or {}).get('mean')):>8}"
        )
    return "\n".join(rows)


def cmd_probe(args) -> int:
    from pathlib import Path

    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.probe import order, run_probe

    if args.folds < 2 or args.shuffles < 0 or args.C <= 0:
        raise DraftGuideError("--folds must be >= 2, --shuffles >= 0 and --C > 0")
    tasks = load_tasks(args.tasks)[0][: args.limit]
    target, tok, draft = load_models(args)
    source = args.tasks if args.tasks == "builtin" else str(Path(args.tasks).resolve())
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
            "tasks": source,
            "limit": args.limit,
        },
    )
    print(
        f"\n{s['n_tasks']} tasks ({s['n_skipped']} skipped)\n{'representation':<16} {'probe':>22} {'shuffled':>8} "
        f"{'zero-shot':>9}"
    )
    for name in order(s["representations"]):
        r = s["representations"][name]
        print(
            f"{name:<16} {r['accuracy']:>6.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
            f"{r['shuffled']['accuracy'] if 'shuffled' in r else float('nan'):>8.3f} {r['zero_shot']['accuracy']:>9.3f}"
        )
    print(f"wrote {args.out}/summary.json, report.md, probe.png, examples.jsonl and features.npz")
    return 0


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
    print(md)
    print(f"wrote {out}/flips.json and flips.md")
    return 0


def _readout_names(specs: list[str | None], target: str | None = None) -> list[str]:
    """Names of several readouts (`diagnose --drafts`, `fidelity --draft A,B`): a folder's name, the init spec, or
    the target's shipped draft for None; repeats (run1/draft, run2/draft) get a suffix, so none is dropped."""
    from draftguide.modeling.draft_io import draft_path

    names: list[str] = []
    for spec in specs:
        if spec is None:
            base = f"{target} (shipped draft)"
        else:
            base = spec if spec.startswith("init") else draft_path(spec).resolve().name
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def cmd_diagnose(args) -> int:
    from pathlib import Path

    from draftguide.experiments.diagnose import compute_solved, results_field, run_diagnose, solved_from
    from draftguide.experiments.diagnostic import CONTROLS, DEFAULT_CONTROLS, EQUIV_MARGIN, MODES
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.modeling.draft_io import draft_path, resolve_draft

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise DraftGuideError(f"--modes {args.modes!r}: expected a comma list of {', '.join(MODES)}")
    if args.controls is None:
        args.controls = ",".join(DEFAULT_CONTROLS)
    if args.margin is None:
        args.margin = EQUIV_MARGIN
    controls = [] if args.no_controls else [c.strip() for c in args.controls.split(",") if c.strip()]
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise DraftGuideError(f"--controls {args.controls!r}: expected a comma list of {', '.join(CONTROLS)}")
    if args.drafts is not None and args.draft is not None:
        raise DraftGuideError("give --draft or --drafts, not both")
    specs = [d.strip() for d in args.drafts.split(",") if d.strip()] if args.drafts is not None else [args.draft]
    if not specs:
        raise DraftGuideError(f"--drafts {args.drafts!r}: expected a comma list of draft folders or init[:LAYERS]")
    for spec in specs:
        if spec is not None and not spec.startswith("init") and not draft_path(spec).exists():
            raise DraftGuideError(f"draft folder '{spec}' does not exist")
    if args.margin <= 0:
        raise DraftGuideError(f"--margin must be > 0, got {args.margin}")
    ttt = _ttt_config(args) if args.ttt else None
    tasks = load_tasks(args.tasks)[0][: args.limit]
    refs = (
        {k: v for k, v in results_field(args.reference_from, "response").items() if isinstance(v, str)}
        if args.reference_from
        else None
    )
    solved = solved_from(args.solved_from) if args.solved_from else None
    frame_file = args.frame_from or args.solved_from
    responses = results_field(frame_file, "response") if frame_file and args.answer_frame == "framed" else None
    args.draft = specs[0]
    target, tok, first = load_models(args)
    readouts = {"draft": first}
    if args.drafts is not None:
        p = next(target.parameters())
        others = [
            resolve_draft(spec, target, tok, target_name=args.target).to(
                device=p.device, dtype=next(first.parameters()).dtype
            )
            for spec in specs[1:]
        ]
        readouts = dict(zip(_readout_names(specs), [first, *others]))
    source = args.tasks if args.tasks == "builtin" else str(Path(args.tasks).resolve())
    if solved is None and not args.no_solve:
        solved, folder = compute_solved(
            target,
            tok,
            tasks,
            Path(args.out),
            args.solve_max_new_tokens,
            {"target": args.target, "dtype": DTYPES[args.dtype], "tasks": source},
        )
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
        settings={
            "target": args.target,
            "drafts": {k: (spec or "shipped") for k, spec in zip(readouts, specs)},
            "dtype": DTYPES[args.dtype],
            "draft_dtype": args.draft_dtype,
            "device": args.device,
            "tasks": source,
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
        },
    )
    print(
        f"\n{s['n_tasks']} tasks, {s['n_tokens']} answer tokens ({s['n_skipped']} tasks skipped without a reference); "
        f"answer frame {args.answer_frame} {s['answer_frame']['tasks_by_frame']}"
    )
    for mode, g in s["modes"].items():
        a = g["all"]
        for name in s["readouts"]:
            print(
                f"{mode:>6} {name}: mean log p target {a['mean_logp']['target']['mean']:.3f}  readout "
                f"{a['mean_logp'][name]['mean']:.3f}  "
                f"median rank target {a['median_rank']['target']['median']:.0f}  readout "
                f"{a['median_rank'][name]['median']:.0f}  "
                f"rank win {a['rank_vs_target'][name]['win']['mean']:.2f}"
            )
    for name, v in s["verdict_details"].items():
        print(f"verdict {name}: {v['verdict']} -- {v['because']}")
    if ttt is not None:
        t, tv = s["ttt"], s["ttt"]["verdict_detail"]
        for mode, g in t["gain_over_base"].items():
            print(
                f"   ttt {mode:>6}: mean per-task log p gain over the base draft {g['mean_per_task_logp_gain']:+.3f} "
                f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
            )
        print(
            f"ttt verdict: {t['verdict']} -- {tv['because']}; context loss {t['mean_context_loss_before']:.3f} -> "
            f"{t['mean_context_loss_after']:.3f}, {t['mean_ttt_seconds']:.2f} s TTT per task"
        )
    print(f"wrote {args.out}/tokens.jsonl, summary.json, report.md and figures")
    return 0


def cmd_profile(args) -> int:
    from draftguide.experiments.profiling import cost_rows, run_profile

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
    print(f"\n{'operation':<52} {'median ms':>10}")
    for r in s["prefill"]:
        print(f"{'target prefill, ' + str(r['context_len']) + ' tokens':<52} {1e3 * r['median_s']:>10.2f}")
    for name, sec, note in cost_rows(s):
        print(f"{name:<52} {1e3 * sec:>10.2f}  {note}")
    m = s["memory_bandwidth"]
    print(
        f"decode bandwidth {s['decode']['achieved_bandwidth_GBps']:.2f} GB/s; measured read {m['read_GBps']:.2f} GB/s, "
        f"copy {m['copy_GBps']:.2f} GB/s ({100 * s['bandwidth_fraction']:.0f}% of the higher)"
    )
    print(f"wrote {args.out}/summary.json, report.md and profile.png")
    return 0


def _memory_only(args, context: int) -> int:
    import json
    from pathlib import Path

    import torch
    from transformers import AutoConfig

    from draftguide.experiments.profiling import memory_estimate
    from draftguide.modeling.draft_io import config_from_dict as _config_from_dict
    from draftguide.modeling.draft_io import draft_path
    from draftguide.modeling.targets import resolve_target
    from draftguide.reporting.runs import write_json

    try:
        config = AutoConfig.from_pretrained(resolve_target(args.target))
    except OSError as e:
        raise DraftGuideError(f"no config for target '{args.target}': {str(e).splitlines()[0]}") from e
    dcfg = None
    if args.draft and not args.draft.startswith("init"):
        path = Path(draft_path(args.draft)) / "config.json"
        if not path.is_file():
            raise DraftGuideError(f"'{path}' does not exist")
        dcfg = _config_from_dict(json.loads(path.read_text()), path)
    m = memory_estimate(config, dtype=getattr(torch, DTYPES[args.dtype]), context_tokens=context, draft_config=dcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "memory.json", m | {"target": args.target, "draft": args.draft, "command": args.command})
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(
        f"{m['params'] / 1e9:.2f}B parameters, weights {gib(m['weight_bytes'])} ({m['dtype']}); a decoded token reads "
        f"{gib(m['weight_bytes_read_per_token'])} (expert fraction {m['expert_fraction']:g}); KV cache "
        f"{m['kv_bytes_per_token'] / 1024:.1f} KiB/token, {gib(m['kv_bytes_at_context'])} at {context} tokens"
        + (
            f"; draft {gib(m['draft_weight_bytes'])}, features {m['feature_bytes_per_token'] / 1024:.1f} KiB/token"
            if dcfg
            else ""
        )
        + f"; total at {context} tokens {gib(m['total_bytes_at_context'])}"
    )
    print(f"wrote {out}/memory.json")
    return 0


def cmd_report(args) -> int:
    from draftguide.reporting.report import write_report

    path = write_report(args.runs, args.out, command=args.command)
    print(f"wrote {path}")
    return 0


def cmd_serve(args) -> int:
    from draftguide.app.pipeline import DraftGuide
    from draftguide.app.server import serve

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DraftGuideError(
            f"serve needs fastapi and uvicorn ({e.name} is missing): pip install fastapi uvicorn"
        ) from e
    from draftguide.app.pipeline import resolve_method

    resolve_method(args.method, args.beta, args.speculative)  # before the models load
    # one draft serves every request: the speculative draft by default (speculative requests need it); an
    # aligned readout given with --draft guides token by token and refuses speculative requests
    _default_draft(
        args,
        "speculative"
        if args.speculative or args.method == "speculative"
        else "guidance"
        if args.beta or args.method == "guided"
        else "speculative",
    )
    if args.max_tokens < 1:
        raise DraftGuideError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_batch < 1:
        raise DraftGuideError(f"--max-batch must be >= 1, got {args.max_batch}")
    defaults = {
        "method": args.method,
        "beta": args.beta,
        "speculative": args.speculative,
        "max_new_tokens": args.max_tokens,
        "ttt": _ttt_config(args, seed=0).kwargs() if args.ttt else None,
    }
    dg = DraftGuide(*load_models(args), name=args.model_name or args.target)
    print(
        f"serving {dg.name} on http://{args.host}:{args.port}/v1 (POST /chat/completions, GET /models)", file=sys.stderr
    )
    serve(dg, args.host, args.port, max_pending=args.max_pending, defaults=defaults, max_batch=args.max_batch)
    return 0


def cmd_sweep_beta(args) -> int:
    from pathlib import Path

    import torch

    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.sweeps import parse_betas, run_beta_sweep, sweep_runs
    from draftguide.modeling.targets import load_target

    betas = parse_betas(args.betas)
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    sweep_runs(betas, baselines)  # unknown baselines fail here
    if args.max_new_tokens < 1:
        raise DraftGuideError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    guided_opts = _flags_for(args, "guided") | ({"ttt": _guided_ttt(args)} if args.ttt else {})
    base_opts = {m: _flags_for(args, m) for m in baselines if m != "greedy"}
    draft = _draft_spec(args, "speculative" if args.speculative else "guidance")
    tasks = load_tasks(args.tasks)[0][: args.limit]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = _batch_size(
        args,
        [m for m in baselines if m in ("power", "dola")]
        + (["speculative"] if guided_opts.get("speculative") or guided_opts.get("ttt") else []),
    )
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
    _with_template(args, tok)
    source = args.tasks if args.tasks == "builtin" else str(Path(args.tasks).resolve())
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
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": source},
        batch_size=batch,
    )
    print(f"\n{'beta':>5} {'guided':>22} {'noise':>22}")
    noise = {p["beta"]: p for p in s["curves"]["noise"]}
    fmt = lambda p: f"{p['solve_rate']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]" if p else "-"  # noqa: E731
    for p in s["curves"]["guided"]:
        print(f"{p['beta']:>5g} {fmt(p):>22} {fmt(noise.get(p['beta'])):>22}")
    for name, g in s["baselines"].items():
        print(f"{name:>5} {fmt(g):>22}")
    print(f"wrote {args.out}/summary.json, report.md, beta_sweep.png and flips.jsonl")
    return 0


def _matrix_readouts(args) -> dict[str, str]:
    """label -> draft spec: `aligned` / `speculative` by each readout's config (repeats numbered)."""
    from draftguide.modeling.draft_io import SHIPPED_DRAFTS, SHIPPED_READOUTS, is_aligned_readout

    if args.readouts.strip() == "auto":
        readout, spec = SHIPPED_READOUTS.get(args.target), SHIPPED_DRAFTS.get(args.target)
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
            raise DraftGuideError(f"no shipped readout or draft for target '{args.target}': pass --readouts")
    else:
        specs = [r.strip() for r in args.readouts.split(",") if r.strip()]
        if not specs:
            raise DraftGuideError(f"--readouts {args.readouts!r}: expected a comma list of readouts")
    out: dict[str, str] = {}
    for spec in specs:
        spec = _draft_spec(args, "guidance", spec)
        base = "aligned" if is_aligned_readout(spec) else "speculative"
        label, i = base, 2
        while label in out:
            label, i = f"{base}{i}", i + 1
        out[label] = spec
    return out


def cmd_matrix(args) -> int:
    from pathlib import Path

    import torch

    from draftguide.experiments.evaluate import check_judge, load_tasks
    from draftguide.experiments.matrix import MatrixConfig, run_matrix
    from draftguide.experiments.sweeps import parse_betas
    from draftguide.modeling.targets import load_target

    betas = [b for b in parse_betas(args.betas) if b > 0]
    if not betas:
        raise DraftGuideError(f"--betas {args.betas!r}: give at least one beta in (0, 1] (greedy, beta 0, always runs)")
    readouts = _matrix_readouts(args)
    ttt_readouts = []
    if not args.no_ttt and args.ttt_readouts:
        specs = {v: k for k, v in readouts.items()}
        for r in (x.strip() for x in args.ttt_readouts.split(",") if x.strip()):
            label = r if r in readouts else specs.get(_draft_spec(args, "guidance", r))
            if label is None:
                raise DraftGuideError(f"--ttt-readouts: {r!r} is not among the readouts ({', '.join(readouts)})")
            ttt_readouts.append(label)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    guided = {k: v for k, v in dict(mix=args.mix, guard_top_k=args.guard_top_k).items() if v is not None}
    from draftguide.decode.baselines import POWER_PRESETS

    preset = args.power_preset or ("paper" if str(device).startswith("cuda") else "cpu")
    if preset not in POWER_PRESETS:
        raise DraftGuideError(f"--power-preset {preset!r}: expected one of {', '.join(POWER_PRESETS)}")
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    cfg = MatrixConfig(
        betas=betas,
        readouts=readouts,
        ttt=None if args.no_ttt else _guided_ttt_opts(args),
        ttt_readouts=ttt_readouts,
        nulls=split(args.nulls),
        baselines=split(args.baselines),
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
    tasks = load_tasks(args.tasks)[0][: args.limit]
    check_judge(tasks, "rules")  # every task needs checks: the matrix scores by rules
    target, tok = load_target(args.target, dtype=getattr(torch, DTYPES[args.dtype]), device=device)
    source = args.tasks if args.tasks == "builtin" else str(Path(args.tasks).resolve())
    s = run_matrix(
        target,
        tok,
        tasks,
        args.out,
        cfg,
        command=args.command,
        settings={"target": args.target, "dtype": DTYPES[args.dtype], "tasks": source},
    )
    print(f"\n{'row':<34} {'n':>4} {'solve rate':>22} {'vs greedy':>26}")
    for e in s["rows"]:
        v = e.get("vs_greedy")
        vs = f"{v['mean_diff']:+.3f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]" if v else ""
        print(f"{e['row']:<34} {e['n']:>4} {e['solve_rate']:>8.3f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] {vs:>26}")
    print(f"decision matrix: {s['decision']}")
    print(f"wrote {args.out}/summary.json, report.md and per_task.jsonl")
    return 0


def _guided_ttt_opts(args) -> dict:
    cfg = _ttt_config(args, seed=args.seed).kwargs()
    return cfg | {"target_modules": list(cfg["target_modules"])}


def cmd_generate(args) -> int:
    from draftguide.app.pipeline import DraftGuide, check_generate

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
    check_generate(**kw)  # before the models load
    from draftguide.modeling.sampling import effective_temperature

    if args.speculative and effective_temperature(args.temperature) > 0:
        raise DraftGuideError("--speculative is exact for greedy decoding only: use --temperature 0")
    _default_draft(args, "speculative" if args.speculative else "guidance")
    dg = DraftGuide(*load_models(args), name=args.target)
    prompt = {"prompt": args.prompt} if args.raw else args.prompt  # a plain string takes the chat template if any

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    g = dg.generate(prompt, seed=args.seed, ttt=_guided_ttt(args), on_text=show, **kw)
    if g.ttt:
        r = g.ttt
        print(
            f"\n[TTT on the prompt: {r['steps']} steps in {r['seconds']:.1f}s, context loss {r['loss_before']:.3f} -> "
            f"{r['loss_after']:.3f}]",
            file=sys.stderr,
        )
    from draftguide.reporting.runs import fmt

    sampled = effective_temperature(args.temperature) > 0
    print(
        f"\n[{len(g.tokens)} tokens in {g.stats['seconds']:.1f}s ({fmt(g.stats['tokens_per_s'], '.1f')} tok/s), beta "
        f"{kw['beta']:g}, "
        f"{'seed ' + str(g.seed) + ', ' if sampled else ''}"
        f"{g.stats.get('n_flips', 0)} tokens flipped by guidance]",
        file=sys.stderr,
    )
    return 0


def cmd_ttt_tau(args) -> int:

    from draftguide.experiments.ttt_measure import parse_sets, run_ttt_tau, tau_table

    ttt = _ttt_config(args)
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
    print("\n" + tau_table(s))
    print(f"wrote {args.out}/results.jsonl and {args.out}/summary.json")
    return 0


def cmd_sweep_ttt(args) -> int:

    from draftguide.experiments.evaluate import load_tasks
    from draftguide.experiments.ttt_measure import parse_list, run_sweep_ttt

    steps = parse_list(args.steps, int, "--steps")
    lrs, ranks = parse_list(args.lr, float, "--lr"), parse_list(args.rank, int, "--rank")
    if min(steps) < 0:
        raise DraftGuideError(f"--steps {args.steps!r}: step counts must be >= 0")
    for lr, rank in ((lr, rank) for lr in lrs for rank in ranks):
        _ttt_config(args, steps=max(steps), lr=lr, rank=rank)  # each grid point valid, before loading models
    ttt = _ttt_config(args, steps=max(steps), lr=lrs[0], rank=ranks[0])  # the options the grid does not vary
    tasks = load_tasks(args.tasks)[0][: args.limit]
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
    print(f"\n{'lr':>8} {'rank':>5} {'steps':>6} {'ctx loss':>9} {'logp gap':>9} {'tau':>7} {'d tau':>7}")
    for r in s["table"]:
        mark = "  <- best" if r is s["best"] else ""
        d = "" if r["delta_tau"] is None else f"{r['delta_tau']:+.3f}"
        print(
            f"{r['lr']:>8g} {r['rank']:>5} {r['steps']:>6} {r['context_loss']:>9.3f} {r['logp_gap']:>9.3f} "
            f"{r['tau']:>7.3f} {d:>7}{mark}"
        )
    print(f"wrote {args.out}/points.jsonl, summary.json, report.md and sweep.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars: noise next to our own progress
    args.argv = ["draftguide", *argv]  # what was run, recorded as is (no command line is rebuilt from options)
    args.command = shlex.join(args.argv)
    try:
        code = args.func(args)
        if code == 0 and getattr(args, "run_folder", True) and getattr(args, "out", None):
            record_command(args.out, args.command)
        return code
    except DraftGuideError as e:
        print(f"draftguide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("draftguide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
