"""The go/no-go readout diagnostic: does the deep (draft) readout rank gold tokens better than the shallow one?

Teacher forcing on `chat_template(messages) + frame + reference_answer`. The *frame* puts the reference where
the target itself would write it (`framed`, the default): the target's own greedy response up to its answer
(up to the reference where the response holds it, else up to the distractor it gave instead, else a short
answer lead such as "The answer is: "), then the reference; `bare` scores the reference right after the
generation prompt. For every answer token t (position P + j, P = prompt + frame length) the gold token's
probability, log-probability and 1-based rank (1 + the number of vocabulary entries with a strictly higher
logit) under

- `target`: the target's own logits at position t - 1 (one target forward per task, shared by every readout);
- each readout (a DFlash draft, `--drafts A,B`), read two ways out of ONE multi-anchor draft forward per
  pathway (blocks are independent under the block mask, so both modes share it):
  - `next`: a block `[tok[t-1], MASK x (B-1)]` anchored at every answer token's predecessor (the draft's
    own block size: fewer masks would change the bidirectional block), offset k = 1 read for token t;
  - `block`: inference-time blocks anchored at P - 1 + b (B - 1), b = 0, 1, ...: the anchor is the last
    given token, as in speculative decoding, and offsets k = 1..B-1 predict the next B-1 answer tokens,
    so every answer token is covered once, at offset k = j mod (B-1) + 1;
- null controls per readout, on the same tokens and read the same way: the readout fed
  `shuffle` = the real target features of another task of the run, aligned at the answer start (real
  statistics, wrong content; positions the two sequences share keep their own, identical, features),
  `gauss` = Gaussian noise matched in mean and std per feature dimension (over the task's positions), and
  `noise` = isotropic noise matched in norm per position and layer (kept for continuity: the target's few
  huge dimensions make it out-of-distribution input rather than uninformative input). `random` (a freshly
  initialised draft of the same shape) is a sanity row only: no rule reads it.

A readout is anything `readout_logits` can read: a `DFlashDraft`, or an object with `target_layer_ids` and
`read_logits(target, features, ids, n_prompt, modes)` (the seam tests use for synthetic readouts).

Summaries bootstrap over tasks (tokens of one task are correlated); the verdict rule is `verdict`'s
docstring. This module is arithmetic only; `report.py` draws and writes.
"""

from __future__ import annotations

import copy
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.readout import MODES, block_reads, readout_logits
from draftguide.modeling.targets import extract_features

NULL_CONTROLS = ("shuffle", "gauss", "noise")  # the verdict's gate: a readout must beat each one it ran with
SANITY_CONTROLS = ("random",)  # reported beside, read by no rule
CONTROLS = NULL_CONTROLS + SANITY_CONTROLS
DEFAULT_CONTROLS = ("shuffle", "gauss")
FRAMES = ("framed", "bare")
DEFAULT_LEAD = (
    "The answer is: "  # framed mode, when the target's response holds neither the reference nor the distractor
)
EQUIV_MARGIN = 0.1  # nats per token: |mean per-task difference| below this counts as no difference (TOST)
BUCKETS = ((0.01, "p<0.01"), (0.1, "0.01<=p<0.1"), (0.5, "0.1<=p<0.5"), (math.inf, "p>=0.5"))
POSITIONS = ("first", "later")  # the reference's first token, and the rest
VERDICT_TOL = 1e-6  # nats: differences below this are float noise, not an effect


def control_pathway(readout: str, control: str) -> str:
    """The pathway name of `readout` run under `control`, e.g. `draft.shuffle`."""
    return f"{readout}.{control}"


# -- per-token scores ---------------------------------------------------------------------------------
def gold_scores(logits: torch.Tensor, gold: torch.Tensor) -> dict[str, np.ndarray]:
    """log p, p and 1-based rank of `gold` under each row of `logits`; rank = 1 + #(logit > gold's logit),
    so ties go to the gold token.
    # logits: [N, V], gold: [N] -> arrays [N]"""
    logits = logits.float()
    g = logits.gather(-1, gold[:, None])  # [N, 1]
    logp = (g[:, 0] - torch.logsumexp(logits, -1)).cpu().numpy().astype(np.float64)
    rank = (1 + (logits > g).sum(-1)).cpu().numpy().astype(np.int64)
    return {"logp": logp, "p": np.exp(logp), "rank": rank}


def confidence_bucket(p_target: float) -> str:
    return next(name for hi, name in BUCKETS if p_target < hi)


# -- null features --------------------------------------------------------------------------------------
def norm_matched_noise(features: torch.Tensor, n_layers: int, seed: int) -> torch.Tensor:
    """Standard Gaussian noise rescaled so that each position's slice of each target layer has the norm
    of the real feature there. # features: [B, T, n*d] -> same shape"""
    B, T, D = features.shape
    f = features.float().reshape(B, T, n_layers, D // n_layers)
    z = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed)).to(f.device)
    z = z * (f.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return z.reshape(B, T, D).to(features.dtype)


def dim_matched_noise(features: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise with the mean and standard deviation of every feature dimension over the sequence's
    positions: the target's few huge dimensions stay huge, position by position nothing is real.
    # features: [B, T, n*d] -> same shape"""
    f = features.float()
    mu, sd = f.mean(1, keepdim=True), f.std(1, keepdim=True, unbiased=False)
    z = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed)).to(f.device)
    return (mu + sd * z).to(features.dtype)


def shared_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D id sequences."""
    n = min(a.shape[0], b.shape[0])
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


def shuffle_index(T: int, n_prompt: int, shared: int, donor_len: int, donor_prompt: int) -> torch.Tensor:
    """Which donor position feeds each of the T positions: positions the two sequences share (`< shared`:
    same tokens, so the same features in a causal model) keep their own; the rest are aligned at the answer
    start (answer token j <- the donor's answer token j, prompt position P - i <- the donor's P_d - i) and
    wrap around within the donor's non-shared part. # -> [T] long"""
    t = torch.arange(T)
    span = donor_len - shared
    if span <= 0:  # the donor is a prefix of this sequence: nothing of its own to give
        return t.clamp(max=donor_len - 1)
    return torch.where(t < shared, t, shared + (donor_prompt + t - n_prompt - shared) % span)


def shuffled_features(features, ids, n_prompt: int, donor_features, donor_ids, donor_prompt: int) -> torch.Tensor:
    """The real target features of another sequence (the donor) in place of this one's: real statistics,
    wrong content. See `shuffle_index`. # features: [1, T, n*d], donor_features: [1, T_d, n*d] -> [1, T, n*d]"""
    s = shared_prefix(ids[0], donor_ids[0])
    idx = shuffle_index(ids.shape[1], n_prompt, s, donor_ids.shape[1], donor_prompt).to(donor_features.device)
    return donor_features[:, idx]


def random_like(draft: DFlashDraft, seed: int = 0) -> DFlashDraft:
    """A freshly initialised draft with `draft`'s config, dtype and device (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnd = DFlashDraft(copy.deepcopy(draft.config))
        rnd.init_weights()
    p = next(draft.parameters())
    return rnd.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


def draft_scores(draft, target, features, ids, n_prompt: int, modes: Iterable[str]) -> dict[str, dict]:
    """Per mode: gold scores of the readout for every answer token and the block offset k each was read at.
    # features: [1, T, n*d], ids: [1, T]"""
    gold = ids[0, n_prompt:]
    return {
        mode: gold_scores(logits, gold) | {"k": np.asarray(ks)}
        for mode, (logits, ks) in readout_logits(draft, target, features, ids, n_prompt, modes).items()
    }


@dataclass
class TargetPass:
    """One target forward over a task: the target's gold scores and the hidden states readouts take features from."""

    ids: torch.Tensor  # [1, T]
    n_prompt: int
    scores: dict
    hidden: dict  # hidden-state index (layer id + 1) -> [1, T, d]

    def features(self, layer_ids) -> torch.Tensor:
        return extract_features(self.hidden, layer_ids)


@torch.inference_mode()
def target_pass(target, ids: torch.Tensor, n_prompt: int, layer_ids: Iterable[int]) -> TargetPass:
    """The target's forward over `ids`: gold scores of the answer tokens `ids[0, n_prompt:]` and the hidden
    states of `layer_ids` (kept, the rest dropped). # ids: [1, T]"""
    A = ids.shape[1] - n_prompt
    if n_prompt < 1 or A < 1:
        raise DraftGuideError(f"need a prompt and an answer token, got {n_prompt} prompt and {A} answer tokens")
    out = target(ids, output_hidden_states=True, logits_to_keep=A + 1)
    scores = gold_scores(out.logits[0, :-1], ids[0, n_prompt:])  # logits at t-1 predict t
    return TargetPass(ids, n_prompt, scores, {i + 1: out.hidden_states[i + 1] for i in set(layer_ids)})


def as_readouts(readouts) -> dict:
    return dict(readouts) if isinstance(readouts, dict) else {"draft": readouts}


@torch.inference_mode()
def score_sequence(
    target,
    readouts,
    ids: torch.Tensor,
    n_prompt: int,
    modes: Iterable[str] = MODES,
    controls: Iterable[str] = (),
    seed: int = 0,
    adapt=None,
    donor: TargetPass | None = None,
    random_drafts: dict | None = None,
    passed: TargetPass | None = None,
) -> dict:
    """Teacher-forced scores of the answer tokens `ids[0, n_prompt:]`: one target forward (or `passed`, its
    result), and per readout (`readouts`: {name: readout}, or one readout named `draft`) one forward per
    pathway: the readout itself (pathway `name`) and under each of `controls` (pathway `name.control`).
    `shuffle` takes its features from `donor` (another task's `TargetPass`); `random` runs
    `random_drafts[name]` on the real features. `adapt(prompt_features, prompt_ids)` returns the first readout
    adapted on the prompt (a context manager that resets it, see `ttt.ttt_adapt`), scored as pathway `ttt`.
    Returns {"target": scores, mode: {pathway: scores (+ "k")}} with arrays over answer tokens, and with
    `adapt` "ttt_report". # ids: [1, T]"""
    modes, controls, readouts = list(modes), list(controls), as_readouts(readouts)
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise DraftGuideError(f"unknown control {bad[0]!r} (expected {', '.join(CONTROLS)})")
    if "shuffle" in controls and donor is None:
        raise DraftGuideError("the shuffle control needs a donor (another task's target pass)")
    layers = {i for r in readouts.values() for i in r.target_layer_ids}
    tp = passed or target_pass(target, ids, n_prompt, layers)
    res: dict = {"target": tp.scores, **{mode: {} for mode in modes}}
    for name, readout in readouts.items():
        feats = tp.features(readout.target_layer_ids)
        runs = {name: (readout, feats)}
        for c in controls:
            if c == "shuffle":
                f = shuffled_features(
                    feats, ids, n_prompt, donor.features(readout.target_layer_ids), donor.ids, donor.n_prompt
                )
            elif c == "gauss":
                f = dim_matched_noise(feats, seed)
            elif c == "noise":
                f = norm_matched_noise(feats, len(readout.target_layer_ids), seed)
            else:  # random: another module on the real features
                if random_drafts is None or name not in random_drafts:
                    continue
                runs[control_pathway(name, c)] = (random_drafts[name], feats)
                continue
            runs[control_pathway(name, c)] = (readout, f)
        for pathway, (module, f) in runs.items():
            for mode, scores in draft_scores(module, target, f, ids, n_prompt, modes).items():
                res[mode][pathway] = scores
    if adapt is not None:
        first = next(iter(readouts.values()))
        feats = tp.features(first.target_layer_ids)
        with adapt(feats[:, :n_prompt], ids[:, :n_prompt]) as adapted:
            for mode, scores in draft_scores(adapted, target, feats, ids, n_prompt, modes).items():
                res[mode]["ttt"] = scores
            res["ttt_report"] = adapted.report.to_dict()
    return res


# -- tasks in, token records out ----------------------------------------------------------------------
@dataclass
class TaskInput:
    task_id: str
    prompt_ids: list[int]  # everything before the reference: chat template, then the frame
    answer_ids: list[int]
    answer_tokens: list[str]
    context: str  # system and user turns: what "in context" means
    category: str
    subcategory: str
    solved: bool | None = None
    answer_words: list[str | None] = field(default_factory=list)  # per answer token: the reference word it is part of
    response: str | None = None  # the target's greedy response, when known
    frame: str = "bare"  # bare | reference | distractor | lead: where the frame came from
    frame_text: str = ""  # the text between the generation prompt and the reference
    n_frame: int = 0  # tokens of frame_text (the tail of prompt_ids)


@dataclass
class Prepared:
    tasks: list[TaskInput]
    skipped: list[dict] = field(default_factory=list)  # {task_id, reason}


def task_id(task: dict, default=None) -> str:
    """A task's id: `metadata.task_id` (CL-bench rows), else `id`, else `default`."""
    return str((task.get("metadata") or {}).get("task_id", task.get("id", default)))


def context_text(task: dict) -> str:
    """The text a task gives the model to learn from: its system and user turns."""
    return "\n".join(m["content"] for m in task.get("messages", []) if m.get("role") in ("system", "user"))


def find_word(text: str, word: str) -> int | None:
    """Start of the first whole-word, case-insensitive occurrence of `word` in `text` (None: none)."""
    word = (word or "").strip()
    if not word or not isinstance(text, str):
        return None
    m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, re.IGNORECASE)
    return None if m is None else m.start()


def answer_frame(
    response: str | None, reference: str, distractor: str | None = None, lead: str = DEFAULT_LEAD
) -> tuple[str, str]:
    """The text the reference is scored after, and where it came from: the target's greedy `response` up
    to the reference (`reference`), else up to the distractor it gave instead (`distractor`: the target's
    answer slot, filled with the reference), else `lead` (`lead`)."""
    if isinstance(response, str):
        for how, ans in (("reference", reference), ("distractor", distractor)):
            at = find_word(response, ans) if ans else None
            if at is not None:
                return response[:at], how
    return lead, "lead"


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and each token's character span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: spans by decoding prefixes
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)) for i in range(len(ids))]
        return list(ids), list(zip([0, *ends[:-1]], ends))


def frame_tokens(tokenizer, frame_text: str, reference: str) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Token ids of `frame_text + reference` tokenized as one text (as the target would read it), the number
    of frame tokens, and each reference token's span in `reference`. The reference starts at the first token
    that reaches into it; a token that also holds frame characters other than whitespace (a merge across the
    boundary) makes the two halves be tokenized apart instead."""
    full = frame_text + reference
    start = len(frame_text)
    ids, offs = encode_with_offsets(tokenizer, full)
    k = next((i for i, (_, e) in enumerate(offs) if e > start), len(ids))
    if k < len(ids) and offs[k][0] < start and full[offs[k][0] : start].strip():
        f_ids, _ = encode_with_offsets(tokenizer, frame_text) if frame_text else ([], [])
        r_ids, r_offs = encode_with_offsets(tokenizer, reference)
        return f_ids + r_ids, len(f_ids), r_offs
    return ids, k, [(max(s - start, 0), e - start) for s, e in offs[k:]]


def token_words(reference: str, spans: list[tuple[int, int]]) -> list[str | None]:
    """Per token span: the reference word (a run of word characters) it overlaps first, or None."""
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\w+", reference)]
    return [next((w for ws, we, w in words if ws < e and we > s), None) for s, e in spans]


def prepare_tasks(
    tasks: list[dict],
    tokenizer,
    references: dict[str, str] | None = None,
    solved: dict[str, bool] | None = None,
    *,
    responses: dict[str, str] | None = None,
    frame: str = "framed",
    lead: str = DEFAULT_LEAD,
) -> Prepared:
    """Token ids of prompt (chat template + frame) and reference answer per task. `references` (task_id ->
    text, e.g. another run's responses) replaces `reference_answer`; a task with no usable reference is
    skipped and counted. `responses` (task_id -> the target's greedy response) give the frame and the
    in-response tag; `frame`: `framed` (see `answer_frame`) or `bare` (the reference right after the
    generation prompt)."""
    from draftguide.modeling.prompts import encode_prompt

    if frame not in FRAMES:
        raise DraftGuideError(f"unknown answer frame {frame!r} (expected {', '.join(FRAMES)})")
    out = Prepared([])
    for t in tasks:
        meta = t.get("metadata") or {}
        tid = task_id(t, default=len(out.tasks) + len(out.skipped))
        ref = references.get(tid) if references is not None else t.get("reference_answer")
        if not isinstance(ref, str) or not ref.strip():
            out.skipped.append({"task_id": tid, "reason": "no reference answer"})
            continue
        response = (responses or {}).get(tid)
        response = response if isinstance(response, str) else None
        text, how = ("", "bare") if frame == "bare" else answer_frame(response, ref, t.get("distractor_answer"), lead)
        ids, n_frame, spans = frame_tokens(tokenizer, text, ref)
        answer = ids[n_frame:]
        if not answer:
            out.skipped.append({"task_id": tid, "reason": "reference answer has no tokens"})
            continue
        out.tasks.append(
            TaskInput(
                task_id=tid,
                prompt_ids=encode_prompt(tokenizer, t)[0].tolist() + ids[:n_frame],
                answer_ids=list(answer),
                answer_tokens=[tokenizer.decode([a]) for a in answer],
                context=context_text(t),
                category=meta.get("context_category") or "(none)",
                subcategory=meta.get("sub_category") or "(none)",
                solved=(solved or {}).get(tid),
                answer_words=token_words(ref, spans),
                response=response,
                frame=how,
                frame_text=text,
                n_frame=n_frame,
            )
        )
    return out


def in_context(token: str, context: str) -> bool:
    """Whether the token's text (stripped, unless it is only whitespace) occurs in the context (a substring
    test on token pieces: guided decoding's flip rows use it; the diagnostic tags whole words, see `find_word`)."""
    key = token.strip() or token
    return bool(key) and key in context


def diagnose(
    target,
    readouts,
    prepared: Prepared,
    *,
    modes: Iterable[str] = MODES,
    controls: Iterable[str] = DEFAULT_CONTROLS,
    random_drafts: dict | None = None,
    seed: int = 0,
    progress: bool = False,
    ttt=None,
) -> list[dict]:
    """Score every prepared task with every readout (`readouts`: {name: readout}, or one readout named
    `draft`) against one target forward per task. Returns one record per (task, answer token) holding the
    target's scores, per mode each pathway's scores and the offset k, and the tags. The `shuffle` control of
    task i reads the features of task i + 1 (the last task: of the first), so it always comes from the same
    run, scored by the same target; with one task it has no other task and equals the readout.
    `ttt` (a `ttt.TTTConfig`) adds pathway `ttt`: the first readout adapted on each task's prompt (system and
    user turns), seeded per task id and reset before the next task, so no task's numbers depend on which tasks
    ran before it; the record then holds its task's `ttt_report`. Controls always run the base readouts."""
    from tqdm.auto import tqdm

    from draftguide.modeling.prompts import check_length

    for t in prepared.tasks:  # teacher forcing reads prompt + answer in one forward: it must fit, before any work
        check_length(
            target,
            len(t.prompt_ids) + len(t.answer_ids),
            where=f"task {t.task_id!r}",
            what="prompt with its reference answer",
        )
    modes, controls, readouts = list(modes), list(controls), as_readouts(readouts)
    if "random" in controls:
        random_drafts = dict(random_drafts or {})
        for name, r in readouts.items():
            if name not in random_drafts and isinstance(r, DFlashDraft):
                random_drafts[name] = random_like(r, seed)
    dev = next(target.parameters()).device
    layers = {i for r in readouts.values() for i in r.target_layer_ids}
    tasks = prepared.tasks
    kept: dict[int, TargetPass] = {}

    def pass_of(i: int) -> TargetPass:
        if i not in kept:
            t = tasks[i]
            kept[i] = target_pass(
                target, torch.tensor([t.prompt_ids + t.answer_ids], device=dev), len(t.prompt_ids), layers
            )
        return kept[i]

    records = []
    first_name = next(iter(readouts))
    for ti, task in enumerate(tqdm(tasks, desc="diagnose", disable=not progress)):
        tp = pass_of(ti)
        donor = pass_of((ti + 1) % len(tasks)) if "shuffle" in controls else None
        noise_seed = zlib.crc32(f"{seed}:{task.task_id}".encode())
        adapt = _adapter(readouts[first_name], target, ttt, task)
        res = score_sequence(
            target, readouts, tp.ids, tp.n_prompt, modes, controls, noise_seed, adapt, donor, random_drafts, tp
        )
        for i in [k for k in kept if k not in (0, ti + 1)]:
            del kept[i]  # keep the first task's pass (the last task's donor) and the next one
        for j, (tok, text) in enumerate(zip(task.answer_ids, task.answer_tokens)):
            tgt = {k: _item(v[j]) for k, v in res["target"].items()}
            word = task.answer_words[j] if j < len(task.answer_words) else None
            ctx = word is not None and find_word(task.context, word) is not None
            resp = None if task.response is None or word is None else find_word(task.response, word) is not None
            rec = {
                "task": ti,
                "task_id": task.task_id,
                "token_index": j,
                "position": len(task.prompt_ids) + j,
                "token_id": int(tok),
                "token": text,
                "word": word,
                "target": tgt,
                "in_context": ctx,
                "in_response": resp,
                "missed": bool(ctx and resp is False),
                "first": j == 0,
                "frame": task.frame,
                "bucket": confidence_bucket(tgt["p"]),
                "category": task.category,
                "subcategory": task.subcategory,
                "solved": task.solved,
            }
            if "ttt_report" in res:
                rec["ttt_report"] = res["ttt_report"]
            for mode in modes:
                rec[mode] = {name: {k: _item(v[j]) for k, v in s.items()} for name, s in res[mode].items()}
            records.append(rec)
    return records


def _adapter(draft, target, ttt, task: TaskInput):
    """`score_sequence`'s `adapt` for one task, or None without TTT."""
    if ttt is None:
        return None
    from draftguide.training.ttt import ttt_adapt

    task_seed = zlib.crc32(f"{ttt.seed}:{task.task_id}".encode())
    return lambda feats, ctx: ttt_adapt(draft, target, ctx, features=feats, **ttt.kwargs(seed=task_seed))


def _item(x):
    return int(x) if isinstance(x, (np.integer, int)) else float(x)


TAGS = (
    "task_id",
    "token_index",
    "position",
    "token_id",
    "token",
    "word",
    "in_context",
    "in_response",
    "missed",
    "first",
    "frame",
    "bucket",
    "category",
    "subcategory",
    "solved",
)


def token_rows(records: list[dict], modes: Iterable[str]) -> Iterable[dict]:
    """Flat rows for `tokens.jsonl`: one per (task, token, pathway); pathways `target` and `<name>_<mode>`
    (`draft_next`, `draft.shuffle_block`, ...)."""
    for r in records:
        base = {k: r.get(k) for k in TAGS}
        yield base | {"pathway": "target", "mode": None, "offset": None} | r["target"]
        for mode in modes:
            for name, s in r[mode].items():
                yield (
                    base
                    | {"pathway": f"{name}_{mode}", "mode": mode, "offset": s["k"]}
                    | {k: v for k, v in s.items() if k != "k"}
                )


def readout_names(records: list[dict], mode: str) -> list[str]:
    """The readouts of a run (pathways that are neither a control nor `ttt`), in run order."""
    return [n for n in records[0][mode] if "." not in n and n != "ttt"]


# -- summaries ----------------------------------------------------------------------------------------
class TaskBootstrap:
    """Percentile bootstrap that resamples tasks, keeping each task's tokens together. `tasks` is the task
    index of every token; statistics are token-weighted over the resampled tasks."""

    def __init__(self, tasks: np.ndarray, n_boot: int = 1000, seed: int = 0):
        uniq, self.inv = np.unique(tasks, return_inverse=True)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        counts = np.zeros((n_boot, len(uniq)))
        np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
        self.w = counts[:, self.inv]  # [n_boot, n_tokens]: how often each token's task was drawn

    def mean(self, x: np.ndarray) -> dict:
        x = np.asarray(x, dtype=float)
        boot = (self.w @ x) / self.w.sum(1)
        return {"mean": float(x.mean()), "ci95": _ci(boot)}

    def median(self, x: np.ndarray) -> dict:
        """Weighted median per resample: the mean of the lower and upper median, as `np.median`."""
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        xs, cum = x[order], self.w[:, order].cumsum(1)
        half = cum[:, -1:] / 2
        lo = xs[(cum < half).sum(1)]
        hi = xs[np.minimum((cum <= half).sum(1), len(xs) - 1)]
        return {"median": float(np.median(x)), "ci95": _ci((lo + hi) / 2)}


def _ci(boot: np.ndarray, level: float = 0.95) -> list[float]:
    a = (1 - level) / 2
    return [float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))]


def _columns(records: list[dict], mode: str) -> dict[str, np.ndarray]:
    cols = {"task": np.array([r["task"] for r in records])}
    for k in ("logp", "p", "rank"):
        cols[f"target_{k}"] = np.array([r["target"][k] for r in records], dtype=float)
    for name in records[0][mode]:
        for k in ("logp", "p", "rank", "k"):
            cols[f"{name}_{k}"] = np.array([r[mode][name][k] for r in records], dtype=float)
    return cols


def group_stats(cols: dict[str, np.ndarray], sel: np.ndarray, n_boot: int = 1000, seed: int = 0, names=None) -> dict:
    """Mean log p and median rank per pathway (`names`, target first), and per other pathway its mean log-p
    difference from the target and its rank win / tie / loss rates against the target (win = strictly lower
    rank), all with 95% CIs over tasks; p win rate as a secondary number."""
    names = names or ["target", *sorted({k.rsplit("_", 1)[0] for k in cols if k.endswith("_logp")} - {"target"})]
    bs = TaskBootstrap(cols["task"][sel], n_boot, seed)
    out: dict = {"n_tokens": int(sel.sum()), "n_tasks": int(len(np.unique(cols["task"][sel])))}
    out["mean_logp"] = {n: bs.mean(cols[f"{n}_logp"][sel]) for n in names}
    out["median_rank"] = {n: bs.median(cols[f"{n}_rank"][sel]) for n in names}
    t_logp, t_rank, t_p = cols["target_logp"][sel], cols["target_rank"][sel], cols["target_p"][sel]
    for n in names[1:]:
        out.setdefault("logp_minus_target", {})[n] = bs.mean(cols[f"{n}_logp"][sel] - t_logp)
        r = cols[f"{n}_rank"][sel]
        out.setdefault("rank_vs_target", {})[n] = {
            "win": bs.mean(r < t_rank),
            "tie": bs.mean(r == t_rank),
            "loss": bs.mean(r > t_rank),
        }
        out.setdefault("p_win_rate", {})[n] = bs.mean(cols[f"{n}_p"][sel] > t_p)
    return out


def groups(records: list[dict], mode: str) -> dict[str, np.ndarray]:
    """Token selections: all, by confidence bucket, solve status, tags (whole word in context, in the
    target's greedy response, missed = in context but not in the response), frame, category, subcategory and
    (block mode) offset; each but the subcategories also split into `|first` and `|later` tokens."""

    def sel(fn):
        return np.array([fn(r) for r in records], dtype=bool)

    g = {"all": np.ones(len(records), dtype=bool)}
    for _, b in BUCKETS:
        g[f"bucket:{b}"] = sel(lambda r, b=b: r["bucket"] == b)
    for name, val in (("failed", False), ("solved", True), ("unknown", None)):
        g[f"task:{name}"] = sel(lambda r, v=val: r["solved"] is v)
    for tag in ("in_context", "in_response", "missed"):
        g[f"{tag}:yes"], g[f"{tag}:no"] = (
            sel(lambda r, t=tag: r.get(t) is True),
            sel(lambda r, t=tag: r.get(t) is False),
        )
    for v in sorted({r.get("frame", "bare") for r in records}):
        g[f"frame:{v}"] = sel(lambda r, v=v: r.get("frame", "bare") == v)
    for v in sorted({r["category"] for r in records}):
        g[f"category:{v}"] = sel(lambda r, v=v: r["category"] == v)
    if mode == "block":
        first = readout_names(records, mode)[0]
        for k in sorted({r[mode][first]["k"] for r in records}):
            g[f"offset:{k}"] = sel(lambda r, k=k: r[mode][first]["k"] == k)
    first_tok = sel(lambda r: r["first"])
    g = {
        **{k: v for k, v in g.items()},
        **{f"{k}|first": v & first_tok for k, v in g.items()},
        **{f"{k}|later": v & ~first_tok for k, v in g.items()},
    }
    for v in sorted({r["subcategory"] for r in records}):
        g[f"subcategory:{v}"] = sel(lambda r, v=v: r["subcategory"] == v)
    return {k: v for k, v in g.items() if v.any()}


def per_task_mean(records: list[dict], fn) -> list[float]:
    """fn(record) averaged over each task's tokens, one value per task (tasks in first-seen order)."""
    per_task: dict[int, list[float]] = {}
    for r in records:
        per_task.setdefault(r["task"], []).append(fn(r))
    return [float(np.mean(v)) for v in per_task.values()]


def _per_task(records: list[dict], fn) -> tuple[np.ndarray, np.ndarray]:
    """(solve status per task: 1 failed, 0 solved, -1 unknown; fn averaged over each task's tokens)."""
    vals: dict[int, list[float]] = {}
    status: dict[int, int] = {}
    for r in records:
        vals.setdefault(r["task"], []).append(fn(r))
        status[r["task"]] = {False: 1, True: 0}.get(r["solved"], -1)
    return np.array([status[t] for t in vals]), np.array([np.mean(v) for v in vals.values()])


def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def mean_stat(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over tasks with its 95% and 90% percentile-bootstrap CIs (resampling tasks)."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return {"mean": None, "ci95": None, "ci90": None, "n_tasks": 0}
    boot = x[_boot_idx(x.size, n_boot, seed)].mean(1)
    return {"mean": float(x.mean()), "ci95": _ci(boot), "ci90": _ci(boot, 0.90), "n_tasks": int(x.size)}


def interaction_stat(x: np.ndarray, status: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """mean over failed tasks - mean over solved tasks of per-task values, with a 95% CI from a bootstrap
    that resamples failed and solved tasks apart (None unless both kinds have a task)."""
    f, s = x[status == 1], x[status == 0]
    if not f.size or not s.size:
        return None
    boot = f[_boot_idx(f.size, n_boot, seed)].mean(1) - s[_boot_idx(s.size, n_boot, seed + 1)].mean(1)
    return {"mean": float(f.mean() - s.mean()), "ci95": _ci(boot), "n_failed": int(f.size), "n_solved": int(s.size)}


def ttt_gain(records: list[dict], mode: str, n_boot: int = 2000, seed: int = 0, base: str = "draft") -> dict:
    """Mean per-task (log p_ttt - log p_base): what adapting the readout on the task's context changed, with a
    bootstrap 95% CI over tasks."""
    from draftguide.reporting.runs import bootstrap_ci

    diffs = per_task_mean(records, lambda r: r[mode]["ttt"]["logp"] - r[mode][base]["logp"])
    return {
        "mean_per_task_logp_gain": float(np.mean(diffs)),
        "ci95": list(bootstrap_ci(diffs, n_boot=n_boot, seed=seed)),
        "n_tasks": len(diffs),
    }


def _f(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def verdict_rule(margin: float) -> str:
    return (
        "per task, the mean over its answer tokens of a log-p difference; 95% (and 90%) percentile-bootstrap CIs "
        "of the mean over tasks. (1) Gate: the readout must beat every null control it ran with (shuffle, gauss, "
        "noise): the 95% CI of mean per-task (log p_readout - log p_control), all tasks, must lie above 0; "
        "otherwise, or with fewer than 2 tasks, or with no null control, the verdict is inconclusive (the readout "
        "does not use the target features). (2) Primary statistic: mean per-task (log p_readout - log p_target) "
        f"over ALL tasks (no selection on the target's failures). Its 90% CI inside (-{margin:g}, +{margin:g}) "
        f"nats per token (two one-sided tests at 5%, margin {margin:g}) -> equivalent; else its 95% CI above 0 "
        "-> draft_better, below 0 -> draft_worse; else inconclusive (neither a difference nor equivalence shown). "
        "Failed-task numbers, the failed-vs-solved interaction and first/later-token numbers are reported beside "
        "it and decide nothing"
    )


def verdict(
    records: list[dict],
    mode: str = "next",
    n_boot: int = 2000,
    seed: int = 0,
    pathway: str = "draft",
    margin: float = EQUIV_MARGIN,
    controls_of: str | None = None,
) -> dict:
    """The verdict of `pathway` (a readout, or `ttt`, whose controls are those of `controls_of`), by the rule
    of `verdict_rule`: a gate against the null controls, then a two-sided test and an equivalence test (TOST,
    margin `margin` nats per token) of mean per-task (log p_pathway - log p_target) over all tasks."""
    base = controls_of or pathway
    ctls = [c for c in NULL_CONTROLS if control_pathway(base, c) in records[0][mode]]
    lp = lambda r: r[mode][pathway]["logp"]  # noqa: E731
    status, d_all = _per_task(records, lambda r: lp(r) - r["target"]["logp"])
    n = len(d_all)
    primary = mean_stat(d_all, n_boot, seed)
    gate = {
        c: mean_stat(
            _per_task(records, lambda r, c=c: lp(r) - r[mode][control_pathway(base, c)]["logp"])[1], n_boot, seed
        )
        for c in ctls
    }
    strongest = min(gate, key=lambda c: gate[c]["mean"]) if gate else None
    failing = [c for c in ctls if not gate[c]["ci95"][0] > VERDICT_TOL]
    lo90, hi90 = primary["ci90"]
    lo95, hi95 = primary["ci95"]
    if n < 2:
        call, why = "inconclusive", f"only {n} task: a CI over tasks means nothing"
    elif not ctls:
        call, why = "inconclusive", "no null control was run (shuffle, gauss or noise): a readout must beat one"
    elif failing:
        c = min(failing, key=lambda c: gate[c]["ci95"][0])
        call, why = (
            "inconclusive",
            (
                f"the readout does not beat its `{c}` null control (mean per-task log p_{pathway} - "
                f"log p_{control_pathway(base, c)} = {_f(gate[c])} nats, 95% CI not above 0): it does "
                "not use the target features, so nothing follows about deep vs shallow readouts"
            ),
        )
    elif -margin < lo90 and hi90 < margin:
        call, why = (
            "equivalent",
            (
                f"mean per-task log p_{pathway} - log p_target = {primary['mean']:+.3f}, 90% CI "
                f"[{lo90:+.3f}, {hi90:+.3f}] inside +-{margin:g} nats (TOST)"
            ),
        )
    elif lo95 > VERDICT_TOL:
        call, why = "draft_better", f"mean per-task log p_{pathway} - log p_target = {_f(primary)} nats, 95% CI above 0"
    elif hi95 < -VERDICT_TOL:
        call, why = "draft_worse", f"mean per-task log p_{pathway} - log p_target = {_f(primary)} nats, 95% CI below 0"
    else:
        call, why = (
            "inconclusive",
            (
                f"mean per-task log p_{pathway} - log p_target = {_f(primary)} nats: the 95% CI holds 0 "
                f"and the 90% CI [{lo90:+.3f}, {hi90:+.3f}] is not inside +-{margin:g} (no equivalence)"
            ),
        )
    if ctls and not failing and n >= 2:
        why += " (gate passed: " + "; ".join(f"beats `{c}` by {_f(gate[c])}" for c in ctls) + ")"
    out = {
        "verdict": call,
        "pathway": pathway,
        "mode": mode,
        "margin": margin,
        "n_tasks": n,
        "n_tokens": len(records),
        "because": why,
        "rule": verdict_rule(margin),
        "basis": "all tasks",
        "mean_per_task_logp_diff": primary["mean"],
        "ci95": primary["ci95"],
        "ci90": primary["ci90"],
        "vs_controls": gate,
        "strongest_control": strongest,
        "gate_passed": bool(ctls) and not failing,
    }
    # beside the rule: failed / solved tasks, their interaction (and a null control's, the regression to the mean
    # that selecting failed tasks brings by itself), first and later tokens
    beside = {
        "failed": mean_stat(d_all[status == 1], n_boot, seed),
        "solved": mean_stat(d_all[status == 0], n_boot, seed),
        "interaction_failed_minus_solved": interaction_stat(d_all, status, n_boot, seed),
    }
    if strongest is not None:
        cp = control_pathway(base, strongest)
        _, d_ctl = _per_task(records, lambda r: r[mode][cp]["logp"] - r["target"]["logp"])
        _, g_ctl = _per_task(records, lambda r: lp(r) - r[mode][cp]["logp"])
        beside["control_failed"] = mean_stat(d_ctl[status == 1], n_boot, seed)
        beside["control_interaction_failed_minus_solved"] = interaction_stat(d_ctl, status, n_boot, seed)
        beside["control_adjusted_interaction"] = interaction_stat(g_ctl, status, n_boot, seed)
    for pos, want in (("first", True), ("later", False)):
        sub = [r for r in records if r["first"] is want]
        if not sub:
            continue
        _, d = _per_task(sub, lambda r: lp(r) - r["target"]["logp"])
        beside[pos] = {
            "vs_target": mean_stat(d, n_boot, seed),
            "n_tokens": len(sub),
            "vs_controls": {
                c: mean_stat(
                    _per_task(sub, lambda r, c=c: lp(r) - r[mode][control_pathway(base, c)]["logp"])[1], n_boot, seed
                )
                for c in ctls
            },
        }
    out["beside"] = beside
    return out


def summarize(
    records: list[dict], modes: Iterable[str], n_boot: int = 1000, seed: int = 0, margin: float = EQUIV_MARGIN
) -> dict:
    """`summary.json` numbers: counts, per mode and group the statistics of `group_stats`, and a verdict per
    readout (`verdicts`; `verdict` is the first readout's)."""
    modes = list(modes)
    if not records:
        raise DraftGuideError("no answer tokens to summarise (every task was skipped)")
    out = {"n_tasks": len({r["task"] for r in records}), "n_tokens": len(records), "modes": {}}
    for mode in modes:
        cols = _columns(records, mode)
        names = ["target", *records[0][mode]]
        out["modes"][mode] = {
            name: group_stats(cols, s, n_boot, seed, names) for name, s in groups(records, mode).items()
        }
    vmode = "next" if "next" in modes else modes[0]
    readouts = readout_names(records, vmode)
    out["readouts"] = readouts
    out["verdicts"] = {r: verdict(records, vmode, seed=seed, pathway=r, margin=margin) for r in readouts}
    out["verdict"] = out["verdicts"][readouts[0]]
    if "ttt" in records[0][modes[0]]:
        out["ttt"] = {
            "verdict": verdict(records, vmode, seed=seed, pathway="ttt", margin=margin, controls_of=readouts[0]),
            "gain_over_base": {m: ttt_gain(records, m, seed=seed, base=readouts[0]) for m in modes},
        }
    return out


__all__ = [
    "BUCKETS",
    "CONTROLS",
    "DEFAULT_CONTROLS",
    "EQUIV_MARGIN",
    "FRAMES",
    "MODES",
    "NULL_CONTROLS",
    "Prepared",
    "TargetPass",
    "TaskBootstrap",
    "TaskInput",
    "answer_frame",
    "block_reads",
    "confidence_bucket",
    "diagnose",
    "dim_matched_noise",
    "draft_scores",
    "find_word",
    "frame_tokens",
    "gold_scores",
    "group_stats",
    "in_context",
    "norm_matched_noise",
    "per_task_mean",
    "prepare_tasks",
    "random_like",
    "readout_logits",
    "score_sequence",
    "shuffled_features",
    "summarize",
    "target_pass",
    "token_rows",
    "ttt_gain",
    "verdict",
]
