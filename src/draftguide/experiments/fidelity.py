"""Readout fidelity: how faithfully a deep readout (a DFlash draft or an aligned readout) reproduces the
target's own next-token distribution, per block offset k, against a shuffled-feature null.

Teacher forcing on `prompt + response` (the target's own greedy response by default). For every anchor `a`
from the last prompt position on and every block offset k = 1..B-1 whose token `a + k` is a response token:

- `top1_agreement`: argmax of the readout at offset k == argmax of the target at position `a + k - 1` (the
  target's distribution for the same token `a + k`);
- `kl`: KL(target || readout) in nats, full vocabulary;
- `logp`: the readout's log p of the sequence's token `a + k` (the target's own greedy token when the
  response is the target's); `target_logp` is the target's log p of the same tokens.

Null control (`shuffled`): the same readout, the same token ids and blocks, fed the real target features of
another sequence at the same positions (cyclically tiled when that one is shorter): real feature
statistics, wrong content. A readout that reads the features must be far above it.
Summaries pool tokens per offset, with a 95% bootstrap CI over sequences for k = 1.
This module is arithmetic and IO of its own run folder; figures are drawn by `fidelity_figure`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, multi_block_hidden
from draftguide.modeling.targets import extract_features
from draftguide.reporting.runs import JsonlWriter, environment, write_json

METRICS = ("top1_agreement", "kl", "logp")
ANCHORS_PER_PASS = 64  # anchors per draft forward: logits are [m, B-1, V] at a time


@dataclass
class Sample:
    """One teacher-forced sequence: `ids` [T] token ids, the loss/score region starts at `n_prompt`."""

    id: str
    ids: list[int]
    n_prompt: int


def anchors_of(sample: Sample) -> list[int]:
    """Anchors whose k = 1 token is a response token: the last prompt position .. T - 2."""
    return list(range(max(sample.n_prompt - 1, 0), len(sample.ids) - 1))


@torch.inference_mode()
def block_logits_at(draft: DFlashDraft, target, features: torch.Tensor, ids: torch.Tensor, anchors: list[int]):
    """Readout logits [m, B-1, V] (float32) of offsets 1..B-1 at `anchors`, in chunks of `ANCHORS_PER_PASS`.
    # features: [1, T, n*d], ids: [1, T]"""
    out = []
    for c in range(0, len(anchors), ANCHORS_PER_PASS):
        pos = torch.tensor([anchors[c : c + ANCHORS_PER_PASS]], device=ids.device)
        h = multi_block_hidden(draft, target, features, ids, pos, rows=slice(1, draft.block_size))[0]  # [m, B-1, d]
        out.append(draft.logits(h, target).float())
    return torch.cat(out)


def offset_scores(
    d_logits: torch.Tensor, t_logp: torch.Tensor, ids: torch.Tensor, anchors: list[int]
) -> dict[int, dict]:
    """Per offset k: arrays over the anchors whose token `a + k` exists.
    # d_logits: [m, B-1, V] readout; t_logp: [T, V] target log-softmax (row t predicts token t+1); ids: [T]"""
    T = ids.shape[0]
    a = torch.tensor(anchors, device=ids.device)
    d_logp = torch.log_softmax(d_logits, -1)
    res = {}
    for k in range(1, d_logits.shape[1] + 1):
        ok = a + k <= T - 1
        if not ok.any():
            continue
        rows, pos = d_logp[ok, k - 1], a[ok] + k - 1  # readout for token a+k; target at a+k-1 predicts it
        t = t_logp[pos]
        tok = ids[pos + 1]
        res[k] = {
            "top1_agreement": (rows.argmax(-1) == t.argmax(-1)).double().cpu().numpy(),
            "kl": (t.exp() * (t - rows)).sum(-1).clamp_min(0).double().cpu().numpy(),
            "logp": rows.gather(-1, tok[:, None])[:, 0].double().cpu().numpy(),
            "target_logp": t.gather(-1, tok[:, None])[:, 0].double().cpu().numpy(),
        }
    return res


def donor_features(features: list[torch.Tensor], i: int) -> torch.Tensor:
    """Real features of sequence `i + 1` (cyclically) at sequence `i`'s positions, tiled when shorter.
    # features: list of [1, T_j, n*d] -> [1, T_i, n*d]"""
    if len(features) < 2:
        raise DraftGuideError("the shuffled-feature null needs at least 2 sequences")
    other, T = features[(i + 1) % len(features)], features[i].shape[1]
    return other[:, torch.arange(T, device=other.device) % other.shape[1]]


@torch.inference_mode()
def target_features(
    target, layer_ids: list[int], sample: Sample, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced target forward: (ids [1, T], features [1, T, n*d], log-softmax [T, V] float32)."""
    ids = torch.tensor([sample.ids], device=device)
    out = target(ids, output_hidden_states=True)
    return ids, extract_features(out.hidden_states, layer_ids), torch.log_softmax(out.logits[0].float(), -1)


# A readout: a DFlash draft (read with `block_logits_at`), or any callable (features, ids, anchors) -> [m, K, V]
Readout = DFlashDraft | Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def measure_fidelity(
    target,
    readouts: dict[str, Readout],
    samples: list[Sample],
    *,
    null: bool = True,
    layer_ids: list[int] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Per readout name (and `NAME/shuffled` for its null): per offset k, per sample, the metric arrays.
    One target forward per sample serves every readout; all drafts must read the same target layers
    (`layer_ids`, default the first draft's; features are kept per sample for the null)."""
    if not samples:
        raise DraftGuideError("no samples to measure fidelity on")
    dev = next(target.parameters()).device
    drafts = [r for r in readouts.values() if isinstance(r, DFlashDraft)]
    layer_ids = layer_ids or (drafts[0].target_layer_ids if drafts else None)
    if layer_ids is None:
        raise DraftGuideError("measure_fidelity needs layer_ids when no readout is a DFlash draft")
    if any(r.target_layer_ids != layer_ids for r in drafts):
        raise DraftGuideError("readouts measured together must read the same target layers")
    passes = [
        target_features(target, layer_ids, s, dev) for s in tqdm(samples, desc="fidelity: target", disable=not progress)
    ]
    feats = [p[1] for p in passes]
    res: dict[str, dict] = {}
    for name, readout in readouts.items():
        read = partial(block_logits_at, readout, target) if isinstance(readout, DFlashDraft) else readout
        runs = {name: lambda i: feats[i]}
        if null:
            runs[f"{name}/shuffled"] = lambda i: donor_features(feats, i)
        for run, feat_of in runs.items():
            per = res.setdefault(run, {})
            for i, (s, (ids, _, t_logp)) in enumerate(
                tqdm(list(zip(samples, passes)), desc=f"fidelity: {run}", disable=not progress)
            ):
                anchors = anchors_of(s)
                scores = offset_scores(read(feat_of(i), ids, anchors), t_logp, ids[0], anchors)
                for k, arrs in scores.items():
                    per.setdefault(k, []).append(arrs)
    return res


def pooled_ci(sums: np.ndarray, counts: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap CI of a token-pooled mean `sum(sums) / sum(counts)`, resampling sequences
    (tokens of one sequence are correlated)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def summarize_fidelity(raw: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Token-pooled means per offset (lists over k = 1..K), n per offset, and a bootstrap CI over sequences
    for k = 1, per run; `NAME/shuffled` runs go under `controls`."""
    out: dict = {"readouts": {}}
    for run, per in raw.items():
        ks = sorted(per)
        row: dict = {"k": ks, "n_tokens": [int(sum(len(a["logp"]) for a in per[k])) for k in ks]}
        for m in (*METRICS, "target_logp"):
            row[m] = [float(np.concatenate([a[m] for a in per[k]]).mean()) for k in ks]
        if 1 in per:
            seqs = per[1]
            for m in METRICS:
                sums = np.array([a[m].sum() for a in seqs])
                counts = np.array([len(a[m]) for a in seqs])
                row[f"{m}_k1_ci"] = pooled_ci(sums, counts, n_boot=n_boot, seed=seed)
        name, _, control = run.partition("/")
        slot = out["readouts"].setdefault(name, {})
        if control:
            slot.setdefault("controls", {})[control] = row
        else:
            slot.update(row)
    return out


def fidelity_table(summary: dict) -> str:
    """Markdown: one row per readout (and its null), agreement / KL / log p at each offset."""
    lines = []
    for name, r in summary["readouts"].items():
        lines += [
            f"### {name}",
            "",
            "| readout | " + " | ".join(f"k={k}" for k in r["k"]) + " |",
            "|---|" + "---|" * len(r["k"]),
        ]
        rows = [("real features", r)] + [(f"null: {c}", v) for c, v in r.get("controls", {}).items()]
        for metric, label in (
            ("top1_agreement", "top-1 agreement"),
            ("kl", "KL(target||readout)"),
            ("logp", "log p(token)"),
        ):
            for tag, v in rows:
                lines.append(f"| {label}, {tag} | " + " | ".join(f"{x:.3f}" for x in v[metric]) + " |")
        lines.append("| target's own log p(token) | " + " | ".join(f"{x:.3f}" for x in r["target_logp"]) + " |")
        lines.append(f"\ntokens per offset: {r['n_tokens']}\n")
    return "\n".join(lines)


# -- inputs -------------------------------------------------------------------------------------------
def target_responses(
    target, tokenizer, prompts: list[dict], max_new_tokens: int, progress: bool = True
) -> list[Sample]:
    """The target's own greedy responses (KV-cached decoding, stopping at its EOS) to chat/raw prompts."""
    from draftguide.decode.speculative import greedy_generate
    from draftguide.modeling.prompts import encode_prompt, stop_token_ids

    dev = next(target.parameters()).device
    stop = stop_token_ids(tokenizer, target)
    out = []
    for row in tqdm(prompts, desc="fidelity: target responses", disable=not progress):
        ids = encode_prompt(tokenizer, row).to(dev)
        toks, _ = greedy_generate(target, ids, max_new_tokens, stop)
        if toks.shape[1] - ids.shape[1] >= 1:
            out.append(Sample(str(row.get("id", len(out))), toks[0].tolist(), ids.shape[1]))
    return out


def samples_from_rows(rows: list[dict]) -> list[Sample]:
    """`samples.jsonl` rows of `make-data` (or of a fidelity run folder) -> samples."""
    return [Sample(str(r.get("id", i)), list(r["input_ids"]), int(r["prompt_len"])) for i, r in enumerate(rows)]


def run_fidelity(
    target,
    readouts: dict[str, Readout],
    samples: list[Sample],
    out_dir: str | Path,
    *,
    null: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    command: str | None = None,
    settings: dict | None = None,
    layer_ids: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Measure, then write `samples.jsonl` (reusable with `--data`), `summary.json`, `fidelity.md` and
    `fidelity.png` to `out_dir`. Returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(out_dir / "samples.jsonl", mode="w") as w:
        for s in samples:
            w.write({"id": s.id, "input_ids": s.ids, "prompt_len": s.n_prompt})
    raw = measure_fidelity(target, readouts, samples, null=null, layer_ids=layer_ids, progress=progress)
    summary = summarize_fidelity(raw, n_boot, seed)
    first = next(iter(summary["readouts"].values()))
    # the headline fields of the first readout, as the contract names them
    summary |= {
        "top1_agreement": first["top1_agreement"],
        "kl": first["kl"],
        "controls": first.get("controls", {}),
        "n_sequences": len(samples),
        "settings": settings or {},
        "command": command,
        "environment": environment(),
    }
    write_json(out_dir / "summary.json", summary)
    (out_dir / "fidelity.md").write_text(fidelity_table(summary) + "\n")
    from draftguide.reporting.plots import fidelity_figure

    fidelity_figure(summary, out_dir / "fidelity.png")
    return summary


__all__ = ["Sample", "measure_fidelity", "run_fidelity", "summarize_fidelity", "target_responses"]
