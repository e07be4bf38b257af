"""`draftguide profile`: the compute budget of a target/draft pair on this machine.

Measured (each timing repeated; median and range kept): target prefill vs context length and the memory
of the features the draft reads (and of the KV cache) there; one cached draft block step (the
speculative inner loop) and one multi-anchor draft pass (diagnostic/TTT); one speculative step and a
target verify forward over 1 and B tokens; plain greedy decode speed turned into achieved memory
bandwidth (weight bytes a decode step must read x tokens/s) next to the machine's measured copy
bandwidth; a TTT step (when `draftguide.training.ttt` is there) and guided decoding per token against greedy
(when `draftguide.decode.guided` is there). Writes summary.json, report.md and profile.png.

Module name: `profiling`, so that it does not shadow the standard library's `profile`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from draftguide.decode.common import now
from draftguide.decode.speculative import (
    draft_read_step,
    greedy_generate,
    measure_verify_costs,
    speculative_generate,
)
from draftguide.modeling.targets import extract_features

CONTEXT_LENS = (256, 512, 1024, 2048, 4096)


def timed(fn: Callable[[], object], repeats: int, device) -> dict:
    """Seconds of `fn()` over `repeats` runs after one warm-up: median, min, max and n."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def _random_ids(target, n: int, seed: int = 0) -> torch.Tensor:
    vocab = target.get_input_embeddings().weight.shape[0]
    dev = next(target.parameters()).device
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(dev)  # [1, n]


def expert_fraction(model) -> float:
    """Share of a mixture-of-experts layer's experts one token runs (`num_experts_per_tok / num_experts`; 1 for
    a dense model)."""
    c = model.config.get_text_config()
    n, k = (
        getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None),
        getattr(c, "num_experts_per_tok", None),
    )
    return min(1.0, k / n) if n and k else 1.0


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied input embedding, of
    which a step reads a single row (a tied one is read whole as the output head), and the experts of a
    mixture-of-experts model, of which a token reads its `num_experts_per_tok` (`expert_fraction`)."""
    seen, total = set(), 0.0
    frac = expert_fraction(model)
    for name, p in model.named_parameters():
        if p.data_ptr() not in seen or p.device.type == "meta":
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size() * (frac if ".experts." in f".{name}." else 1.0)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb is not head and (emb.device.type == "meta" or emb.data_ptr() != head.data_ptr()):
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return int(total)


def memory_estimate(config, dtype: torch.dtype = torch.bfloat16, context_tokens: int = 8192, draft_config=None) -> dict:
    """Memory of a target (and a draft) from their configs alone (meta tensors: nothing is allocated): weight
    bytes, the bytes one decode step reads, the KV cache per context token and at `context_tokens`, and the
    target features a draft reads per context token. # config: a transformers config of a causal LM"""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    c = model.config.get_text_config()
    kv = kv_bytes_per_token(model)
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weights,
        "weight_bytes_read_per_token": weight_bytes_per_token(model),
        "expert_fraction": expert_fraction(model),
        "kv_bytes_per_token": kv,
        "context_tokens": context_tokens,
        "kv_bytes_at_context": kv * context_tokens,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if draft_config is not None:
        from draftguide.modeling.draft import DFlashDraft

        with torch.device("meta"):
            d = DFlashDraft(draft_config)
        n_feat = len(d.target_layer_ids)
        out |= {
            "draft_params": sum(p.numel() for p in d.parameters()),
            "draft_weight_bytes": sum(p.numel() for p in d.parameters()) * size,
            "feature_bytes_per_token": n_feat * c.hidden_size * size,
        }
    out["total_bytes_at_context"] = (
        out["weight_bytes"]
        + out["kv_bytes_at_context"]
        + out.get("draft_weight_bytes", 0)
        + out.get("feature_bytes_per_token", 0) * context_tokens
    )
    return out


def kv_bytes_per_token(model) -> int:
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


@torch.inference_mode()
def prefill_curve(target, draft, lens: list[int], repeats: int) -> list[dict]:
    """Target forward over the whole context with the hidden states the draft needs, per context length."""
    dev = next(target.parameters()).device
    rows = []
    for n in lens:
        ids = _random_ids(target, n)

        def run():
            out = target(ids, output_hidden_states=True, logits_to_keep=1)
            return extract_features(out.hidden_states, draft.target_layer_ids)  # [1, n, k*d]

        t = timed(run, repeats, dev)  # its warm-up run is the only untimed prefill
        d, size = draft.fc.in_features, target.get_input_embeddings().weight.element_size()  # fc reads n*k*d features
        rows.append(
            {
                "context_len": n,
                **t,
                "tokens_per_s": n / t["median_s"],
                "features_bytes": n * d * size,
                "kv_cache_bytes": n * kv_bytes_per_token(target),
            }
        )
    return rows


@torch.inference_mode()
def draft_costs(target, draft, context_len: int, anchors: int, repeats: int) -> dict:
    """One cached block step (1 new context position + a block of B, with the lm_head over B-1 positions) and
    one multi-anchor pass over `context_len` positions with `anchors` blocks (hidden states only)."""
    from draftguide.modeling.draft import multi_block_hidden

    dev, B = next(target.parameters()).device, draft.block_size
    ids = _random_ids(target, context_len + 1)
    out = target(ids, output_hidden_states=True, logits_to_keep=1)
    feats = extract_features(out.hidden_states, draft.target_layer_ids)  # [1, L+1, k*d]
    read = draft_read_step(target, draft, feats)  # offsets 1..B-1, as speculative decoding reads them

    m = min(anchors, context_len - 1)
    starts = torch.linspace(0, context_len - 1, m, device=dev).long()[None]  # [1, m]
    multi = timed(
        lambda: multi_block_hidden(draft, target, feats[:, :context_len], ids[:, :context_len], starts), repeats, dev
    )
    return {
        "context_len": context_len,
        "block_size": B,
        "block_step": timed(lambda: read(B - 1), repeats, dev),
        "multi_anchor": multi | {"anchors": m, "query_tokens": m * B},
    }


def _prompt_ids(tokenizer, target) -> torch.Tensor:
    from draftguide.modeling.prompts import BUILTIN_PROMPTS, encode_prompt

    row = (
        BUILTIN_PROMPTS[3] if tokenizer.chat_template is not None else {"prompt": "Explain photosynthesis to a child."}
    )
    return encode_prompt(tokenizer, row).to(next(target.parameters()).device)


def decode_costs(target, tokenizer, draft, new_tokens: int, repeats: int) -> dict:
    """Greedy decode speed and achieved weight bandwidth; a speculative step against a target verify."""
    next(target.parameters()).device
    ids = _prompt_ids(tokenizer, target)
    # no stop tokens: every run decodes exactly `new_tokens` and the rates compare like with like
    greedy = [greedy_generate(target, ids, new_tokens)[1] for _ in range(repeats + 1)][1:]
    per_tok = statistics.median(s.decode_s / max(s.num_new_tokens - 1, 1) for s in greedy)
    wbytes = weight_bytes_per_token(target)
    spec = [speculative_generate(target, draft, ids, new_tokens)[1] for _ in range(repeats + 1)][1:]
    steps = [len(s.acceptance_lengths) for s in spec]
    verify = measure_verify_costs(target, context_len=ids.shape[1], max_tokens=draft.block_size, repeats=repeats)
    return {
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "n": repeats,
        "greedy_s_per_token": per_tok,
        "greedy_tokens_per_s": 1 / per_tok,
        "weight_bytes_per_token": wbytes,
        "kv_bytes_per_context_token": kv_bytes_per_token(target),
        "achieved_bandwidth_GBps": wbytes / per_tok / 1e9,
        "speculative_step_s": statistics.median(s.decode_s / max(n, 1) for s, n in zip(spec, steps)),
        "speculative_tau": statistics.median(s.tau for s in spec),
        "speculative_tokens_per_s": statistics.median(s.num_new_tokens / s.total_s for s in spec),
        "verify_1_s": verify[0],
        f"verify_{draft.block_size}_s": verify[-1],
    }


def memory_bandwidth(device, megabytes: int = 256, repeats: int = 3) -> dict:
    """The machine's practical ceilings on a `megabytes` fp32 tensor: a copy (read + write bytes per second)
    and a sum (read bytes per second; a decode step mostly reads). Best of `repeats`."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), repeats, device)
    read = timed(lambda: src.sum(), repeats, device)
    return {
        "bytes": n * 4,
        "n": repeats,
        "copy_s": copy["min_s"],
        "read_s": read["min_s"],
        "copy_GBps": 2 * n * 4 / copy["min_s"] / 1e9,
        "read_GBps": n * 4 / read["min_s"] / 1e9,
    }


def ttt_cost(target, draft, context_len: int, steps: int, prefill_s: float | None) -> dict:
    """Seconds per TTT step on a `context_len` context, and 16 steps relative to one target prefill of it
    (the budget of issue 6: within 20x on the 2-core CPU)."""
    try:
        from draftguide.training.ttt import ttt_adapt
    except ImportError:
        return {"available": False}
    ids = _random_ids(target, context_len, seed=1)
    adapted = ttt_adapt(draft, target, ids, steps=steps, seed=0)
    r = adapted.report
    adapted.reset()
    step_s = r.seconds / max(r.steps, 1)  # `seconds` covers the training steps only
    base = prefill_s or r.prefill_seconds
    return {
        "available": True,
        "context_len": context_len,
        "steps": r.steps,
        "step_s": step_s,
        "seconds": r.seconds,
        "prefill_seconds": r.prefill_seconds,
        "eval_seconds": r.eval_seconds,
        "peak_mem_bytes": r.peak_mem_bytes,
        "peak_mem_kind": r.peak_mem_kind,
        "ttt16_over_prefill": 16 * step_s / base if base else None,
    }


def guided_cost(target, tokenizer, draft, new_tokens: int, greedy_s_per_token: float, repeats: int = 3) -> dict:
    """Guided decoding (beta 0.5), token by token and block-verified (whole block, and one drafted token per
    step, the cheaper choice where a target forward over more tokens costs much more, as on a CPU), per token
    against plain greedy, decode only on both sides (median of `repeats` runs after a short warm-up)."""
    try:
        from draftguide.decode.guided import guided_generate
    except ImportError:
        return {"available": False}
    ids = _prompt_ids(tokenizer, target)
    out = {"available": True, "beta": 0.5, "new_tokens": new_tokens, "greedy_s_per_token": greedy_s_per_token}
    for name, kw in (
        ("token", {}),
        ("speculative", {"speculative": True}),
        ("speculative_v1", {"speculative": True, "verify_len": 1}),
    ):
        guided_generate(target, draft, ids, beta=0.5, max_new_tokens=4, **kw)  # warm-up
        runs = [
            guided_generate(target, draft, ids, beta=0.5, max_new_tokens=new_tokens, **kw)[1] for _ in range(repeats)
        ]
        per = statistics.median(st.decode_s / max(st.num_new_tokens - 1, 1) for st in runs)  # decode only, as greedy's
        out[f"{name}_s_per_token"] = per
        out[f"{name}_over_greedy"] = per / greedy_s_per_token
    return out


def run_profile(
    target,
    tokenizer,
    draft,
    out_dir,
    *,
    context_lens=CONTEXT_LENS,
    repeats: int = 3,
    new_tokens: int = 32,
    anchors: int = 64,
    ttt_steps: int = 4,
    ttt_context: int = 1024,
    copy_megabytes: int = 256,
    command: str = "",
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    from draftguide.reporting.runs import environment, write_json

    dev = next(target.parameters()).device
    limit = getattr(target.config.get_text_config(), "max_position_embeddings", None) or max(context_lens)
    lens = sorted({int(n) for n in context_lens if 1 < n <= limit})

    def say(msg):
        if progress:
            print(f"profile: {msg}", flush=True)

    say(f"prefill at {lens}")
    prefill = prefill_curve(target, draft, lens, repeats)
    mid = min(lens, key=lambda n: abs(n - 1024))
    say(f"draft at context {mid}")
    dcost = draft_costs(target, draft, mid, anchors, repeats)
    say("decode, speculative step, verify")
    decode = decode_costs(target, tokenizer, draft, new_tokens, repeats)
    say("memory bandwidth")
    bw = memory_bandwidth(dev, copy_megabytes, repeats)
    tctx = min(lens, key=lambda n: abs(n - ttt_context))
    say(f"TTT ({ttt_steps} steps at context {tctx})")
    ttt = ttt_cost(target, draft, tctx, ttt_steps, next(r["median_s"] for r in prefill if r["context_len"] == tctx))
    say("guided decoding")
    guided = guided_cost(target, tokenizer, draft, new_tokens, decode["greedy_s_per_token"], repeats)
    summary = {
        "kind": "profile",
        "device": str(dev),
        "dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "target_layer_ids": list(draft.target_layer_ids),
        "prefill": prefill,
        "draft": dcost,
        "decode": decode,
        "memory_bandwidth": bw,
        "bandwidth_fraction": decode["achieved_bandwidth_GBps"] / max(bw["read_GBps"], bw["copy_GBps"]),
        "ttt": ttt,
        "guided": guided,
        "command": command,
        "settings": settings or {},
        "environment": environment(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from draftguide.reporting.plots import profile_figure

    figures = {"profile.png": profile_figure(summary, out_dir / "profile.png")}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.md").write_text(profile_markdown(summary, figures))
    return summary


# -- outputs ------------------------------------------------------------------------------------------
def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1e3 * s:.2f}"


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def cost_rows(s: dict) -> list[tuple[str, float, str]]:
    """(operation, median seconds, note) for the cost table and the bar chart."""
    d, dec, B = s["draft"], s["decode"], s["draft"]["block_size"]
    rows = [
        ("target decode step (greedy, 1 token)", dec["greedy_s_per_token"], f"{dec['greedy_tokens_per_s']:.1f} tok/s"),
        ("target verify forward, 1 token", dec["verify_1_s"], f"after a {dec['prompt_tokens']}-token prompt"),
        (f"target verify forward, {B} tokens", dec[f"verify_{B}_s"], ""),
        ("draft block step (cached, + lm_head)", d["block_step"]["median_s"], f"context {d['context_len']}, block {B}"),
        (
            "draft multi-anchor pass",
            d["multi_anchor"]["median_s"],
            f"{d['multi_anchor']['anchors']} anchors x {B} over {d['context_len']} positions",
        ),
        (
            "speculative step (draft + verify + bookkeeping)",
            dec["speculative_step_s"],
            f"tau {dec['speculative_tau']:.2f}, {dec['speculative_tokens_per_s']:.1f} tok/s",
        ),
    ]
    if s["ttt"].get("available"):
        t = s["ttt"]
        rows.append(
            (
                "TTT step",
                t["step_s"],
                f"context {t['context_len']}; 16 steps = {t['ttt16_over_prefill']:.1f}x one prefill",
            )
        )
    if s["guided"].get("available"):
        g = s["guided"]
        rows.append(
            (
                "guided decoding, per token",
                g["token_s_per_token"],
                f"{g['token_over_greedy']:.2f}x greedy (beta {g['beta']})",
            )
        )
        rows.append(
            (
                "exact speculative guided, per token",
                g["speculative_s_per_token"],
                f"{g['speculative_over_greedy']:.2f}x greedy",
            )
        )
        if "speculative_v1_s_per_token" in g:  # profiles written before verify_len existed lack it
            rows.append(
                (
                    "exact speculative guided, verify_len 1",
                    g["speculative_v1_s_per_token"],
                    f"{g['speculative_v1_over_greedy']:.2f}x greedy",
                )
            )
    return rows


def profile_markdown(s: dict, figures: dict[str, dict]) -> str:
    cmd = s.get("command") or "(library call)"
    dec, m = s["decode"], s["memory_bandwidth"]
    lines = [
        "# Compute profile",
        "",
        f"Command: `{cmd}`",
        "",
        f"Device {s['device']}, {s['threads']} threads, {s['dtype']}; every time is the median of n = {s['repeats']} "
        "runs "
        "after a warm-up, with the range [min, max], except the verify forwards and the bandwidths: best of n.",
        "",
        "## Target prefill vs context length",
        "",
        "| context | prefill ms [min, max] | tokens/s | selected hidden states MiB | KV cache MiB |",
        "|---|---|---|---|---|",
    ]
    for r in s["prefill"]:
        lines.append(
            f"| {r['context_len']} | {_ms(r['median_s'])} [{_ms(r['min_s'])}, {_ms(r['max_s'])}] | "
            f"{r['tokens_per_s']:.0f} | "
            f"{_mb(r['features_bytes'])} | {_mb(r['kv_cache_bytes'])} |"
        )
    lines += [
        "",
        f"Selected hidden states: target layers {s['target_layer_ids']} (the draft's features).",
        "",
        "## Cost per operation",
        "",
        "| operation | median ms | note |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_ms(sec)} | {note} |" for name, sec, note in cost_rows(s)]
    for key, what in (
        ("ttt", "TTT (`draftguide.training.ttt`)"),
        ("guided", "guided decoding (`draftguide.decode.guided`)"),
    ):
        if not s[key].get("available"):
            lines += ["", f"{what}: not available in this installation, not measured."]
    lines += [
        "",
        "## Decode memory bandwidth",
        "",
        f"A greedy decode step reads {_mb(dec['weight_bytes_per_token'])} MiB of weights (plus "
        f"{dec['kv_bytes_per_context_token']} bytes of KV cache per context token); at "
        f"{dec['greedy_tokens_per_s']:.1f} tokens/s "
        f"that is **{dec['achieved_bandwidth_GBps']:.2f} GB/s**. Measured on a {_mb(m['bytes'])} MiB tensor (best of "
        f"{m['n']}): "
        f"read (sum) **{m['read_GBps']:.2f} GB/s**, copy (read + write) **{m['copy_GBps']:.2f} GB/s**; decode reaches "
        f"{100 * s['bandwidth_fraction']:.0f}% of the higher.",
        "",
        "## Figures",
        "",
    ]
    for name, f in figures.items():
        lines += [f"![{name}]({name})", "", f"*{name}*: {f['caption']} Command: `{cmd}`.", ""]
    return "\n".join(lines)


__all__ = [
    "expert_fraction",
    "memory_estimate",
    "memory_bandwidth",
    "decode_costs",
    "draft_costs",
    "prefill_curve",
    "run_profile",
    "weight_bytes_per_token",
]
