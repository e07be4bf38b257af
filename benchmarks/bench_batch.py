"""Throughput of batched evaluation (issue 18), all in one run on one target:

- `eval` (greedy, rules judge) over the built-in suite at each --batch-sizes value: tasks per second and
  generated tokens per second (goal: batch 8 >= 3x batch 1);
- guided decoding (beta --beta, the shipped draft) at --guided-batch: seconds per generated token relative
  to greedy at the same batch size (goal: <= 1.2x);
- agreement: the share of tasks whose batched response equals the batch-1 response token for token, and at
  each first difference the target's top-2 logit margin (teacher-forced on the batch-1 prefix), to show that
  differences come from near-ties (float rounding of padded vs unpadded shapes), not from a bug.

Each configuration runs `run_eval` into its own folder (fresh, so nothing is resumed); wall time of the
whole eval (prefill, decode, scoring) is what counts.

- decode scaling (`--decode-tokens N`, 0 to skip): the same prompts decoded for exactly N tokens (no stop) at
  each batch size, minus the same run with 1 token, gives the decode-only tokens/s; with the eval's prefill
  share at batch 1 (prefill runs row by row, exactly its batch-1 prefill) that bounds the eval's speedup
  (Amdahl): 1 / (prefill_share + (1 - prefill_share) / decode_speedup).

    OMP_NUM_THREADS=1 python benchmarks/bench_batch.py --limit 64 --max-new-tokens 64 \
        --out benchmarks/results/batch_eval.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from draftguide.decode.batched import batch_generate
from draftguide.experiments.evaluate import load_tasks, run_eval
from draftguide.modeling.prompts import encode_prompt
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json


def rows_of(out: Path) -> dict:
    return {r["task_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def run(target, tok, tasks, out: Path, method: str, batch: int, max_new_tokens: int, opts: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_eval(
        target,
        tok,
        tasks,
        out,
        method=method,
        max_new_tokens=max_new_tokens,
        judge="rules",
        method_options=opts or {},
        batch_size=batch,
        progress=False,
    )
    wall = time.perf_counter() - t0
    rows = rows_of(out)
    n_tok = sum(r["new_tokens"] for r in rows.values())
    errors = [r["error"] for r in rows.values() if r.get("status") != "ok"]
    return {
        "method": method,
        "batch_size": batch,
        "seconds": wall,
        "tasks": len(rows),
        "tasks_per_s": len(rows) / wall,
        "new_tokens": n_tok,
        "tokens_per_s": n_tok / wall,
        "s_per_token": wall / max(n_tok, 1),
        "solve_rate": sum(r.get("score") or 0 for r in rows.values()) / len(rows),
        "errors": errors[:3],
        "_rows": rows,
    }


@torch.inference_mode()
def first_difference(target, tok, task, a: list[int], b: list[int]) -> dict:
    """Where two responses part, and the target's top-2 logit margin there after the common prefix."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = encode_prompt(tok, task)
    seq = torch.cat([ids, torch.tensor([a[:i]], dtype=torch.long)], 1).to(next(target.parameters()).device)
    logits = target(seq, logits_to_keep=1).logits[0, -1].float()
    top = logits.topk(2)
    return {
        "index": i,
        "batch1_token": a[i] if i < len(a) else None,
        "batched_token": b[i] if i < len(b) else None,
        "top2_margin": float(top.values[0] - top.values[1]),
    }


def agreement(target, tok, tasks, ref: dict, other: dict) -> dict:
    by_id = {t["metadata"]["task_id"]: t for t in tasks}
    same, diffs = 0, []
    for tid, r in ref.items():
        a, b = r["response"], other[tid]["response"]
        if a == b:
            same += 1
            continue
        ta, tb = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
        diffs.append({"task_id": tid} | first_difference(target, tok, by_id[tid], ta, tb))
    return {"identical": same, "n": len(ref), "rate": same / len(ref), "differences": diffs}


@torch.inference_mode()
def timed_batch(target, prompts: list[torch.Tensor], batch: int, n_tokens: int) -> float:
    t0 = time.perf_counter()
    batch_generate(target, prompts, n_tokens, stop_token_ids=[], max_batch=batch)
    return time.perf_counter() - t0


def decode_scaling(target, tok, tasks, sizes: list[int], n_tokens: int) -> dict:
    """Decode-only tokens/s per batch size (fixed length, no stops) and the prefill share of a batch-1 run."""
    prompts = [encode_prompt(tok, t)[0] for t in tasks]
    rows = []
    for b in sizes:
        full, one = timed_batch(target, prompts, b, n_tokens), timed_batch(target, prompts, b, 1)
        rows.append(
            {
                "batch_size": b,
                "seconds_n_tokens": full,
                "seconds_1_token": one,
                "decode_tokens_per_s": len(prompts) * (n_tokens - 1) / max(full - one, 1e-9),
            }
        )
        print(f"decode batch {b:>3}: {rows[-1]['decode_tokens_per_s']:.1f} tok/s (prefill+1 token {one:.0f}s)")
    for r in rows:
        r["decode_speedup_vs_batch1"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return {"n_tokens": n_tokens, "prompts": len(prompts), "runs": rows}


def amdahl_bound(eval_batch1: dict, prefill_1: float, decode: dict) -> list[dict]:
    """The eval's speedup bound per batch size: its batch-1 prefill share never shrinks (row-by-row prefill)."""
    share = min(prefill_1 / eval_batch1["seconds"], 1.0)
    return [
        {
            "batch_size": r["batch_size"],
            "prefill_share_batch1": share,
            "bound": 1 / (share + (1 - share) / r["decode_speedup_vs_batch1"]),
        }
        for r in decode["runs"]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="the guided run's draft (default: the shipped one)")
    ap.add_argument("--tasks", default="builtin")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--guided-batch", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode-scaling run length (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/batch_eval.json")
    args = ap.parse_args()

    target, tok = load_target(args.target, dtype=getattr(torch, args.dtype), device=args.device)
    tasks = load_tasks(args.tasks)[0][: args.limit]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if sizes[0] != 1:  # every ratio is against batch 1
        sizes = [1, *[b for b in sizes if b != 1]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    runs = []
    for b in sizes:
        r = run(target, tok, tasks, tmp / f"greedy{b}", "greedy", b, args.max_new_tokens)
        runs.append(r)
        print(
            f"greedy batch {b:>3}: {r['tasks_per_s']:.3f} tasks/s, {r['tokens_per_s']:.1f} tok/s ({r['seconds']:.0f}s)",
            flush=True,
        )
    base = runs[0]
    for r in runs:
        r["speedup_vs_batch1"] = r["tasks_per_s"] / base["tasks_per_s"]
        r["agreement_vs_batch1"] = agreement(target, tok, tasks, base["_rows"], r["_rows"]) if r is not base else None
    draft = args.draft or "smollm2-135m-dflash"
    gb = args.guided_batch
    greedy_b = next((r for r in runs if r["batch_size"] == gb), None) or run(
        target, tok, tasks, tmp / f"greedy{gb}", "greedy", gb, args.max_new_tokens
    )
    guided = run(
        target, tok, tasks, tmp / f"guided{gb}", "guided", gb, args.max_new_tokens, {"beta": args.beta, "draft": draft}
    )
    print(
        f"guided batch {gb}: {guided['s_per_token'] / greedy_b['s_per_token']:.2f}x greedy's seconds per token",
        flush=True,
    )
    shutil.rmtree(tmp, ignore_errors=True)
    scaling = None
    if args.decode_tokens > 1:
        scaling = decode_scaling(target, tok, tasks, sizes, args.decode_tokens)
        # the eval's own prefill + first token at batch 1 is scaling's 1-token run at batch 1
        scaling["eval_speedup_bound"] = amdahl_bound(base, scaling["runs"][0]["seconds_1_token"], scaling)
        for r in scaling["eval_speedup_bound"]:
            print(f"eval speedup bound at batch {r['batch_size']}: {r['bound']:.2f}x", flush=True)
    for r in runs + [guided]:
        r.pop("_rows", None)
    greedy_b.pop("_rows", None)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_batch.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "target": args.target,
        "dtype": args.dtype,
        "device": args.device,
        "limit": len(tasks),
        "max_new_tokens": args.max_new_tokens,
        "greedy": runs,
        "guided": guided
        | {
            "beta": args.beta,
            "draft": draft,
            "s_per_token_vs_greedy_same_batch": guided["s_per_token"] / greedy_b["s_per_token"],
        },
        "decode_scaling": scaling,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
