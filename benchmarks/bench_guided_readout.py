"""Per-token cost of token-by-token guided decoding with an *aligned readout*, relative to plain greedy
decoding of the same target (goal: <= 1.15x on this CPU), one run.

The aligned readout (`context_includes_anchor`) reads the anchor's own target features, so each step is:
target decoder pass of the last token -> its features -> the readout's block at that anchor -> one shared
head call for both next-token logits -> the mix. Cost does not depend on training, so when the shipped
readout (`smollm2-135m-readout`) is not there yet, an untrained readout of the shipped draft's shape
(`DFlashDraft.for_target(..., context_includes_anchor=True)`: layers, block size, target layers, MLP width,
mask token) stands in; the JSON says which was used.

Methods alternate per prompt and repeat; each takes its best time per prompt; no stop tokens, so each
produces exactly --max-new-tokens tokens. Prompts: tasks spread over the built-in suite (as bench_guided.py).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_guided_readout.py [--readout DIR] [--n-tasks 6]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm.auto import tqdm

from draftguide.decode.guided import guided_generate
from draftguide.decode.speculative import greedy_generate
from draftguide.experiments.evaluate import load_tasks
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.draft_io import MODELS_DIR, draft_path, load_draft
from draftguide.modeling.prompts import encode_prompt
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json

GOAL = 1.15


def readout_for(target, spec: str | None, layers: int | None = None):
    """(readout, what it is): the given or shipped aligned readout, else one of the shipped draft's shape
    (`layers`: with that many layers instead, to measure the layer-count lever)."""
    if spec is None and layers is None and (MODELS_DIR / "smollm2-135m-readout" / "config.json").is_file():
        spec = "smollm2-135m-readout"
    if spec is not None:
        d = load_draft(spec, target)
        if not d.context_includes_anchor:
            raise SystemExit(f"{spec} is not an aligned readout (context_includes_anchor is false)")
        return d, str(draft_path(spec))
    shape = load_draft("smollm2-135m-dflash", target)
    c = shape.config
    n = layers or len(shape.layers)
    d = DFlashDraft.for_target(
        target,
        num_layers=n,
        block_size=shape.block_size,
        mask_token_id=shape.mask_token_id,
        target_layer_ids=shape.target_layer_ids,
        intermediate_size=c.intermediate_size,
        context_includes_anchor=True,
    )
    return d, (
        f"untrained aligned readout of smollm2-135m-dflash's shape, {n} layers"
        + (" (the readout is not shipped yet)" if layers is None else " (the layer-count lever)")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument(
        "--readout",
        default=None,
        help="aligned readout folder or shipped name (default: smollm2-135m-readout "
        "when shipped, else an untrained one of the shipped draft's shape)",
    )
    ap.add_argument(
        "--layers", type=int, default=None, help="an untrained readout of the shipped shape with this many layers"
    )
    ap.add_argument(
        "--draft-dtypes", default="float32,bfloat16", help="comma list: the readout's dtype(s); the target stays fp32"
    )
    ap.add_argument("--tasks", default="builtin")
    ap.add_argument("--n-tasks", type=int, default=6)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/guided_readout.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target, device="cpu")
    base, what = readout_for(target, args.readout, args.layers)
    base = base.eval().requires_grad_(False)
    names = {"fp32": "float32", "bf16": "bfloat16"}
    dtypes = [names.get(d.strip(), d.strip()) for d in args.draft_dtypes.split(",") if d.strip()]
    readouts = {dt: copy.deepcopy(base).to(getattr(torch, dt)) for dt in dtypes}
    tasks = load_tasks(args.tasks)[0]
    step = max(1, len(tasks) // args.n_tasks)
    prompts = [encode_prompt(tok, t) for t in tasks[::step][: args.n_tasks]]
    fns = {"greedy": lambda ids, n: greedy_generate(target, ids, n)}
    for dt, d in readouts.items():
        fns[f"guided@{dt}"] = lambda ids, n, d=d: guided_generate(target, d, ids, beta=args.beta, max_new_tokens=n)
    for fn in fns.values():  # warm-up
        fn(prompts[0][:, :16], 4)

    totals, decode_tot, n_tok, rows = {k: 0.0 for k in fns}, {k: 0.0 for k in fns}, {k: 0 for k in fns}, []
    for i, ids in enumerate(tqdm(prompts, desc="bench_guided_readout")):
        best, decode = {k: float("inf") for k in fns}, {k: float("inf") for k in fns}
        for r in range(args.repeats):
            for name in list(fns) if (i + r) % 2 == 0 else list(fns)[::-1]:
                t0 = time.perf_counter()
                out, st = fns[name](ids, args.max_new_tokens)
                best[name] = min(best[name], time.perf_counter() - t0)
                decode[name] = min(decode[name], st.decode_s)
                n = out.shape[1] - ids.shape[1]
        for k in fns:
            totals[k] += best[k]
            decode_tot[k] += decode[k]
            n_tok[k] += n
        rows.append({"prompt_tokens": ids.shape[1], "new_tokens": n, "seconds": best, "decode_seconds": decode})
    per_tok = {k: totals[k] / n_tok[k] for k in fns}
    ratios = {
        dt: {
            "cost_vs_greedy": per_tok[f"guided@{dt}"] / per_tok["greedy"],
            "decode_cost_vs_greedy": decode_tot[f"guided@{dt}"] / decode_tot["greedy"],
        }
        for dt in readouts
    }
    for r in ratios.values():
        r["goal_met"] = r["cost_vs_greedy"] <= GOAL
    res = {
        "target": args.target,
        "target_dtype": "float32",
        "readout": what,
        "aligned": True,
        "readout_layers": len(base.layers),
        "block_size": base.block_size,
        "target_layer_ids": base.target_layer_ids,
        "beta": args.beta,
        "n_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "goal_cost_vs_greedy": GOAL,
        "seconds_per_token": per_tok,
        "by_readout_dtype": ratios,
        "prompts": rows,
        "environment": environment(),
    }
    write_json(args.out, res)
    print(f"readout: {what}")
    print("s/token: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in per_tok.items()))
    for dt, r in ratios.items():
        print(
            f"readout {dt}: guided / greedy cost per token {r['cost_vs_greedy']:.3f} (goal <= {GOAL}; decode only "
            f"{r['decode_cost_vs_greedy']:.3f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
