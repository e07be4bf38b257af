"""Cost of test-time training: TTT wall time per context in units of one target prefill of the same context.

The issue's goal: 16 steps on a 1K-token context within 20x the prefill time on the 2-core CPU. The context is
the built-in suite's context documents (system + user turns) joined and cut to `--context-tokens` tokens. The
prefill (the target forward that gives the draft its features: output_hidden_states, last logits only) is
timed best-of-`--repeats` after a warm-up; each TTT variant is timed best-of-`--repeats` (`report.seconds`:
the training steps, without the loss measurements before/after, reported apart). Writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_ttt.py [--draft DIR] [--context-tokens 1024] [--steps 16] \\
        [--threads 1] [--json benchmarks/results/ttt.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from draftguide.experiments.tasks import load_builtin_tasks
from draftguide.modeling.draft_io import resolve_draft
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json
from draftguide.training.ttt import ttt_adapt

VARIANTS = {  # on top of the defaults: LoRA rank 8 on fc, q_proj, k_proj, v_proj
    "default": {},
    "fc-only": {"target_modules": ("fc",)},
    "grad-ckpt": {"gradient_checkpointing": True},
    "bf16-autocast": {"autocast_dtype": "bfloat16"},
}


def long_context(tokenizer, n_tokens: int) -> torch.Tensor:
    """[1, n_tokens]: the suite's context documents, joined until there are enough tokens."""
    ids: list[int] = []
    for task in load_builtin_tasks():
        text = "\n".join(m["content"] for m in task["messages"] if m["role"] in ("system", "user"))
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return torch.tensor([ids[:n_tokens]])
    raise SystemExit(f"the suite has fewer than {n_tokens} context tokens")


@torch.inference_mode()
def time_prefill(target, ids: torch.Tensor, repeats: int) -> float:
    target(ids, output_hidden_states=True, logits_to_keep=1)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        target(ids, output_hidden_states=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder (default: the shipped draft)")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--anchors-per-step", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--json", default="benchmarks/results/ttt.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target)
    draft = resolve_draft(args.draft, target, tok, target_name=args.target)
    ids = long_context(tok, args.context_tokens)
    prefill = time_prefill(target, ids, max(args.repeats, 2))
    rows = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        runs = [
            ttt_adapt(draft, target, ids, steps=args.steps, anchors_per_step=args.anchors_per_step, **VARIANTS[name])
            for _ in range(args.repeats)
        ]
        best = min(runs, key=lambda a: a.report.seconds).report
        for a in runs:
            a.reset()
        rows[name] = {
            "ttt_s": best.seconds,
            "s_per_step": best.seconds / max(best.steps, 1),
            "ratio_to_prefill": best.seconds / prefill,
            "all_ttt_s": [a.report.seconds for a in runs],
            "eval_s": best.eval_seconds,
            "loss_before": best.loss_before,
            "loss_after": best.loss_after,
            "acc_k1_before": best.acc_before[0],
            "acc_k1_after": best.acc_after[0],
            "n_trainable_params": best.n_trainable_params,
            "peak_mem_bytes": best.peak_mem_bytes,
            "peak_mem_kind": best.peak_mem_kind,
        }
        print(
            f"{name:<32} {best.seconds:7.2f} s  {best.seconds / prefill:6.2f}x prefill  loss {best.loss_before:.3f} -> "
            f"{best.loss_after:.3f}"
        )
    head = rows[next(iter(rows))]
    result = {
        "command": "python benchmarks/bench_ttt.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "variants"),
        "target": args.target,
        "draft": args.draft or "shipped",
        "context_tokens": ids.shape[1],
        "steps": args.steps,
        "anchors_per_step": args.anchors_per_step,
        "threads": args.threads,
        "prefill_s": prefill,
        "goal": {"steps": 16, "context_tokens": 1024, "max_ratio_to_prefill": 20.0},
        "within_goal": head["ratio_to_prefill"] <= 20.0,
        "variants": rows,
        "environment": environment(),
    }
    write_json(Path(args.json), result)
    print(f"prefill {prefill:.2f} s ({ids.shape[1]} tokens, {args.threads} thread(s)); wrote {args.json}")


if __name__ == "__main__":
    main()
