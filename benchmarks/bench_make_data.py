"""make-data's decoding, one run: the batched loop (`batched.batch_generate`, finished rows leave the batch) that
`make_data` uses now, against HF `generate` over the same left-padded batches (what `make_data` did before issue
18: it kept decoding finished rows). Greedy; reports seconds, response tokens and how many samples are identical.

    OMP_NUM_THREADS=1 python benchmarks/bench_make_data.py --n 24 --batch-size 8 --max-new-tokens 64 \
        --out benchmarks/results/issue18/make_data.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from draftguide.experiments.evaluate import load_tasks
from draftguide.modeling.prompts import encode_prompt, stop_token_ids
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json
from draftguide.training.data import make_data, read_samples


@torch.inference_mode()
def hf_generate_samples(target, tok, rows, max_new_tokens: int, batch_size: int, max_prompt_tokens: int) -> dict:
    """The former make_data loop: sorted by length, left-padded batches through HF generate, cut at a stop token."""
    from transformers import GenerationConfig

    todo = [(r, encode_prompt(tok, r)[0]) for r in rows]
    todo = sorted([x for x in todo if x[1].numel() <= max_prompt_tokens], key=lambda x: x[1].numel())
    stop = stop_token_ids(tok, target)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop or None,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    out_rows = {}
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        L = max(x[1].numel() for x in batch)
        inp = torch.full((len(batch), L), pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for i, (_, ids) in enumerate(batch):
            inp[i, L - ids.numel() :], att[i, L - ids.numel() :] = ids, 1
        out = target.generate(input_ids=inp, attention_mask=att, generation_config=gc)
        for i, (row, ids) in enumerate(batch):
            resp = out[i, L:].tolist()
            cut = next((j + 1 for j, t in enumerate(resp) if t in stop), len(resp))
            out_rows[row["id"]] = ids.tolist() + resp[:cut]
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=24, help="prompts: the first N built-in tasks' messages")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/issue18/make_data.json")
    args = ap.parse_args()
    target, tok = load_target(args.target)
    rows = [{"id": t["metadata"]["task_id"], "messages": t["messages"]} for t in load_tasks("builtin")[0][: args.n]]
    t0 = time.perf_counter()
    ref = hf_generate_samples(target, tok, rows, args.max_new_tokens, args.batch_size, args.max_prompt_tokens)
    hf_s = time.perf_counter() - t0
    d = tempfile.mkdtemp(prefix="bench-make-data-")
    t0 = time.perf_counter()
    make_data(
        target,
        tok,
        rows,
        d,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        progress=False,
    )
    new_s = time.perf_counter() - t0
    got = {r["id"]: r["input_ids"] for r in read_samples(d)}
    n_resp = sum(len(v) for v in got.values()) - sum(len(encode_prompt(tok, r)[0]) for r in rows if r["id"] in got)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_make_data.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "samples": len(got),
        "response_tokens": n_resp,
        "hf_generate_s": hf_s,
        "batched_loop_s": new_s,
        "speedup": hf_s / new_s,
        "identical_samples": sum(ref.get(k) == v for k, v in got.items()),
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(
        f"HF generate {hf_s:.1f}s, batched loop {new_s:.1f}s ({hf_s / new_s:.2f}x), "
        f"{result['identical_samples']}/{len(got)} identical; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
