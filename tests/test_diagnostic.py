"""The readout diagnostic: exact ranks, a draft that copies the target reads as the target, both draft modes
equal the inference path they stand for, skipped rows are counted, controls and bootstrap do what they say,
the verdict must beat its null controls (synthetic readouts with known effects, an untrained draft), answers
are framed in the target's own words with the reference's tokens where they should be, tags are whole words,
several readouts share one run, and the CLI records the argv it ran."""

import json
import shlex

import numpy as np
import pytest
import torch

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.cli import main
from draftguide.decode.speculative import speculative_generate
from draftguide.experiments.diagnostic import (
    TaskBootstrap,
    answer_frame,
    block_reads,
    diagnose,
    dim_matched_noise,
    frame_tokens,
    gold_scores,
    norm_matched_noise,
    prepare_tasks,
    random_like,
    score_sequence,
    shuffle_index,
    summarize,
)
from draftguide.modeling.draft import DraftCache
from draftguide.modeling.draft_io import resolve_draft
from draftguide.modeling.targets import extract_features


def _task(tid, answer=None, cat="A", sub="a", context="The code word is tulip.", question="Code word?"):
    row = {
        "messages": [{"role": "system", "content": context}, {"role": "user", "content": question}],
        "rubrics": ["r"],
        "checks": [{"type": "regex", "value": "."}],
        "metadata": {"task_id": tid, "context_id": f"c-{tid}", "context_category": cat, "sub_category": sub},
    }
    if answer is not None:
        row["reference_answer"] = answer
    return row


TASKS = [
    _task("t0", "tulip"),
    _task("t1", "12 apples and 3 pears", "B", "b"),
    _task("t2", "xyz", "B", "c"),
    _task("t3", "Lyon, not Paris", "A", "a"),
]


class CopyTargetDraft(torch.nn.Module):
    """A stub with the draft's interface whose logits are the target's: its only feature is the target's last
    layer (final norm applied), and the block query at position p returns that feature at p - 1."""

    context_includes_anchor = False

    def __init__(self, target, block_size=4, mask_token_id=3):
        super().__init__()
        self.target_layer_ids = [target.config.num_hidden_layers - 1]
        self.block_size, self.mask_token_id = block_size, mask_token_id
        self.d = target.config.hidden_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def embed(self, target, ids):
        return torch.zeros(*ids.shape, self.d)

    def forward(self, noise_embedding, target_hidden, position_ids, cache=None, attention_mask=None):
        q = noise_embedding.shape[1]
        pos = (position_ids[0, -q:] - 1).clamp(max=target_hidden.shape[1] - 1)
        return target_hidden[:, pos]

    def logits(self, hidden, target):
        return target.lm_head(hidden)


@pytest.fixture(scope="module")
def pair():
    t = tiny_target()
    return t, tiny_draft(t, mask_token_id=3), char_tokenizer()


# -- arithmetic ---------------------------------------------------------------------------------------
def test_ranks_are_one_based_and_match_a_brute_force_sort():
    logits = torch.randn(50, 97, generator=torch.Generator().manual_seed(0))
    gold = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    gold[0] = logits[0].argmax()  # a top-1 token has rank 1
    s = gold_scores(logits, gold)
    brute = [1 + sorted(range(97), key=lambda v: -float(logits[i, v])).index(int(gold[i])) for i in range(50)]
    assert s["rank"].tolist() == brute and s["rank"][0] == 1 and s["rank"].min() >= 1
    np.testing.assert_allclose(s["logp"], torch.log_softmax(logits, -1)[torch.arange(50), gold].numpy(), atol=1e-6)
    np.testing.assert_allclose(s["p"], np.exp(s["logp"]))


def test_task_bootstrap_equals_explicit_task_resampling():
    rng = np.random.default_rng(0)
    tasks = np.repeat(np.arange(7), rng.integers(1, 6, 7))
    x = rng.normal(size=tasks.size).round(1)  # ties too
    bs = TaskBootstrap(tasks, n_boot=50, seed=3)
    m, med = bs.mean(x), bs.median(x)
    assert m["mean"] == pytest.approx(x.mean()) and med["median"] == pytest.approx(np.median(x))
    for b in range(50):  # each resample: every token of a drawn task, as many times as the task was drawn
        pooled = np.repeat(x, bs.w[b].astype(int))
        assert (bs.w[b] @ x) / bs.w[b].sum() == pytest.approx(pooled.mean())
        # the median of the b-th resample, recomputed by hand, lies inside the bootstrap distribution's range
        order = np.argsort(x, kind="stable")
        cum = bs.w[b, order].cumsum()
        half = cum[-1] / 2
        assert (x[order][(cum < half).sum()] + x[order][min((cum <= half).sum(), x.size - 1)]) / 2 == pytest.approx(
            np.median(pooled)
        )
    assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]


def test_noise_matches_norm_per_position_and_layer_and_random_draft_is_seeded(pair):
    target, draft, _ = pair
    f = torch.randn(1, 9, 3 * 64) * torch.arange(1, 10.0)[None, :, None]
    z = norm_matched_noise(f, 3, seed=5)
    torch.testing.assert_close(z.view(1, 9, 3, 64).norm(dim=-1), f.view(1, 9, 3, 64).norm(dim=-1))
    assert not torch.allclose(z, f) and torch.equal(z, norm_matched_noise(f, 3, seed=5))
    state = torch.random.get_rng_state()
    r1, r2 = random_like(draft, seed=7), random_like(draft, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert r1.state_dict().keys() == draft.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values()))
    assert not torch.equal(r1.fc.weight, draft.fc.weight)


# -- the readout paths --------------------------------------------------------------------------------
def test_draft_copying_the_target_gives_identical_numbers(pair):
    target, _, tok = pair
    stub = CopyTargetDraft(target)
    prepared = prepare_tasks(TASKS, tok, solved={"t0": False, "t1": False, "t2": True, "t3": False}, frame="bare")
    records = diagnose(target, stub, prepared, controls=("noise",))
    assert len(records) == sum(len(t.answer_ids) for t in prepared.tasks)
    for r in records:
        for mode in ("next", "block"):
            d = r[mode]["draft"]
            assert d["rank"] == r["target"]["rank"]
            assert d["logp"] == pytest.approx(r["target"]["logp"], abs=1e-5)
    s = summarize(records, ["next", "block"], n_boot=200)
    win = s["modes"]["next"]["all"]["rank_vs_target"]["draft"]
    assert win["win"]["mean"] == 0 and win["tie"]["mean"] == 1
    # the controls are not the target: the noise-fed copy differs
    assert s["modes"]["next"]["all"]["rank_vs_target"]["draft.noise"]["tie"]["mean"] < 0.5


def _inference_block(draft, target, feats, ids, anchor):
    """One block through the cached inference path: context < anchor (in two chunks), then [tok, MASK...]."""
    B, cache = draft.block_size, DraftCache(len(draft.layers))
    half = anchor // 2
    draft(draft.embed(target, ids[:, :1]), feats[:, :half], torch.arange(half + 1)[None], cache=cache)
    block = torch.full((1, B), draft.mask_token_id)
    block[0, 0] = ids[0, anchor]
    h = draft(draft.embed(target, block), feats[:, half:anchor], torch.arange(half, anchor + B)[None], cache=cache)
    return draft.logits(h, target)[0]  # [B, V]


def test_next_mode_equals_one_anchor_at_a_time_inference(pair):
    target, draft, _ = pair
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    P = 19
    res = score_sequence(target, draft, ids, P, modes=["next"])
    with torch.no_grad():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
        rows = torch.stack([_inference_block(draft, target, feats, ids, t - 1)[1] for t in range(P, 30)])
    ref = gold_scores(rows, ids[0, P:])
    assert res["next"]["draft"]["rank"].tolist() == ref["rank"].tolist()
    np.testing.assert_allclose(res["next"]["draft"]["logp"], ref["logp"], atol=1e-4)
    assert res["next"]["draft"]["k"].tolist() == [1] * (30 - P)
    # and the target numbers are the target's own next-token log-probs
    full = torch.log_softmax(target(ids).logits[0, P - 1 : -1], -1)
    np.testing.assert_allclose(res["target"]["logp"], full[torch.arange(30 - P), ids[0, P:]].numpy(), atol=1e-5)


def test_block_mode_equals_speculative_decoding_blocks():
    """Every full block speculative decoding drafts (anchor s = the last committed token) is reproduced by
    block mode with the answer starting right after s: offsets k = 1..B-1 give the same scores."""
    target = tiny_target(vocab=12, seed=1)
    draft = tiny_draft(target, mask_token_id=11, seed=11, block_size=4)
    prompt = torch.randint(0, 11, (1, 10), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = draft.register_forward_hook(
        lambda m, args, out: seen.append((int(args[2][0, -args[0].shape[1]]), args[0].shape[1], out))
    )
    tokens, stats = speculative_generate(target, draft, prompt, 30)
    hook.remove()
    full = [(s, out) for s, n, out in seen if n == draft.block_size and s > prompt.shape[1]]
    assert len(full) >= 3
    B = draft.block_size
    for s, out in full:
        n_ans = min(B - 1, tokens.shape[1] - s - 1)
        ids = tokens[:, : s + 1 + n_ans]
        res = score_sequence(target, draft, ids, s + 1, modes=["block"])["block"]["draft"]
        with torch.no_grad():
            ref = gold_scores(
                draft.logits(out[:, :n_ans], target)[0], ids[0, s + 1 :]
            )  # decoding reads offsets 1.. only
        assert res["k"].tolist() == list(range(1, n_ans + 1))
        assert res["rank"].tolist() == ref["rank"].tolist()
        np.testing.assert_allclose(res["logp"], ref["logp"], atol=1e-4)


def test_block_mode_tiles_the_answer_with_offsets(pair):
    target, draft, _ = pair  # block size 8: 7 tokens per block
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    res = score_sequence(target, draft, ids, 20, modes=["block", "next"])
    assert res["block"]["draft"]["k"].tolist() == [1, 2, 3, 4, 5, 6, 7] * 2 + [1, 2, 3, 4, 5, 6]
    # offset 1 of a block is the same computation as next mode at that anchor
    for j in (0, 7, 14):
        assert res["block"]["draft"]["logp"][j] == pytest.approx(res["next"]["draft"]["logp"][j], abs=1e-5)


# -- rows, tags, skipping -----------------------------------------------------------------------------
def test_tasks_without_reference_are_skipped_and_counted(pair):
    _, _, tok = pair
    rows = [_task("a", "tulip"), _task("b"), _task("c", "   "), _task("d", "xy")]
    p = prepare_tasks(rows, tok)
    assert [t.task_id for t in p.tasks] == ["a", "d"]
    assert [s["task_id"] for s in p.skipped] == ["b", "c"]
    p = prepare_tasks(rows, tok, references={"b": "from another run", "a": ""})
    assert [t.task_id for t in p.tasks] == ["b"] and "".join(p.tasks[0].answer_tokens) == "from another run"
    assert len(p.skipped) == 3


def test_tags_are_whole_words_in_context_and_in_the_greedy_response(pair):
    target, draft, tok = pair
    rows = [_task("a", "tulip!"), _task("b", "lip tulip", context="A tulip, a rose.")]
    p = prepare_tasks(rows, tok, solved={"a": True}, responses={"a": "It is a Tulip.", "b": "A rose."}, frame="bare")
    recs = diagnose(target, draft, p, modes=["next"], controls=())
    a = [r for r in recs if r["task_id"] == "a"]
    assert [r["token"] for r in a] == list("tulip!") and [r["word"] for r in a] == ["tulip"] * 5 + [None]
    assert [r["in_context"] for r in a] == [True] * 5 + [False]  # "!" is no word
    assert [r["in_response"] for r in a] == [True] * 5 + [None]  # whole word, case-insensitive
    assert [r["first"] for r in a] == [True] + [False] * 5
    assert all(r["solved"] is True and r["category"] == "A" and r["subcategory"] == "a" for r in a)
    b = [r for r in recs if r["task_id"] == "b"]
    # "lip" occurs in the context only inside "tulip": not a whole word; "tulip" is in context, not in the response
    assert [r["in_context"] for r in b] == [False] * 3 + [False] + [True] * 5
    assert [r["missed"] for r in b] == [False] * 4 + [True] * 5
    assert all(r["solved"] is None for r in b)
    for r in recs:
        p_t = r["target"]["p"]
        want = "p<0.01" if p_t < 0.01 else "0.01<=p<0.1" if p_t < 0.1 else "0.1<=p<0.5" if p_t < 0.5 else "p>=0.5"
        assert r["bucket"] == want


# -- answers in the target's frame ----------------------------------------------------------------------
def _bpe_tokenizer():
    """A small byte-level BPE, trained here, whose merges glue a leading space to a word (as GPT-2-style
    tokenizers do): where the frame/answer boundary is visible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [
        "The answer is: tulip",
        "The answer is tulip.",
        "the code word is tulip",
        "answers: 12 apples and 3 pears",
    ] * 50
    tk.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_answer_frame_prefers_the_reference_then_the_distractor_then_the_lead():
    assert answer_frame("The answer is: Tulip.", "tulip", "rose") == ("The answer is: ", "reference")
    assert answer_frame("I think it is rose, not tulips", "tulip", "rose") == ("I think it is ", "distractor")
    assert answer_frame("No idea.", "tulip", "rose", lead="A: ") == ("A: ", "lead")
    assert answer_frame(None, "tulip", "rose") == ("The answer is: ", "lead")
    assert answer_frame("tulipa is it", "tulip", None)[1] == "lead"  # whole words only


@pytest.mark.parametrize("frame", ["The answer is: ", "The answer is ", "", "code word: \n"])
def test_framed_answer_span_is_the_reference_tokens(frame):
    tok = _bpe_tokenizer()
    ref = "tulip"
    ids, n_frame, spans = frame_tokens(tok, frame, ref)
    assert ids == tok(frame + ref, add_special_tokens=False)["input_ids"]  # the text as the target reads it
    assert tok.decode(ids[n_frame:]).strip() == ref and tok.decode(ids[:n_frame]) == frame.rstrip(" ")
    assert spans[0][0] == 0 and spans[-1][1] == len(ref)
    if frame.endswith(" "):  # the merge is visible: the space travels with the word
        assert tok.decode(ids[n_frame:]) == " " + ref and len(ids[n_frame:]) == len(
            tok(" " + ref, add_special_tokens=False)["input_ids"]
        )


def test_framed_prepare_puts_the_reference_after_the_response_prefix(pair):
    _, _, tok = pair
    row = _task("a", "tulip") | {"distractor_answer": "rose"}
    p = prepare_tasks([row], tok, responses={"a": "So: rose."})
    t = p.tasks[0]
    assert t.frame == "distractor" and t.frame_text == "So: " and t.n_frame == len("So: ")
    assert (
        "".join(tok.decode([i]) for i in t.prompt_ids[-t.n_frame :]) == "So: " and "".join(t.answer_tokens) == "tulip"
    )
    bare = prepare_tasks([row], tok, responses={"a": "So: rose."}, frame="bare").tasks[0]
    assert bare.answer_ids == t.answer_ids and bare.prompt_ids == t.prompt_ids[: -t.n_frame] and bare.frame == "bare"


# -- controls -------------------------------------------------------------------------------------------
def test_dim_matched_noise_matches_mean_and_std_per_dimension():
    f = torch.randn(1, 4000, 6) * torch.tensor([1.0, 5, 0.1, 700, 2, 3]) + torch.tensor([0.0, 1, -2, 300, 0, 9])
    z = dim_matched_noise(f, seed=1)
    torch.testing.assert_close(z.mean(1), f.mean(1), rtol=0.05, atol=0.2 * f.std(1).max().item() / 20)
    torch.testing.assert_close(z.std(1), f.std(1), rtol=0.05, atol=1e-3)
    assert torch.equal(z, dim_matched_noise(f, seed=1)) and not torch.equal(z, dim_matched_noise(f, seed=2))


def test_shuffle_index_keeps_shared_positions_and_aligns_the_answer():
    idx = shuffle_index(T=10, n_prompt=6, shared=2, donor_len=12, donor_prompt=8).tolist()
    assert idx[:2] == [0, 1]  # shared prefix: own (identical) features
    assert idx[6:] == [8, 9, 10, 11]  # answer token j <- donor answer token j
    assert idx[5] == 7 and idx[2] == 4  # prompt positions counted back from the answer start
    assert shuffle_index(T=10, n_prompt=6, shared=2, donor_len=5, donor_prompt=3).max() < 5  # wraps in a short donor


class FeatureFreeReadout:
    """A readout that ignores the target features: logits from the token ids alone."""

    target_layer_ids = [1]
    block_size = 4

    def read_logits(self, target, features, ids, n_prompt, modes):
        logits = target.lm_head(target.get_input_embeddings()(ids[0, n_prompt - 1 : -1]))
        return {m: (logits, block_reads(ids.shape[1] - n_prompt, self.block_size, [m])[1][m][1]) for m in modes}


def test_shuffle_control_differs_when_features_matter_and_equals_when_ignored(pair):
    target, _, tok = pair
    prepared = prepare_tasks(TASKS, tok, frame="bare")
    recs = diagnose(
        target,
        {"copy": CopyTargetDraft(target), "blind": FeatureFreeReadout()},
        prepared,
        modes=["next"],
        controls=("shuffle", "gauss"),
    )
    copy = np.array([r["next"]["copy"]["logp"] for r in recs])
    copy_sh = np.array([r["next"]["copy.shuffle"]["logp"] for r in recs])
    assert np.abs(copy - copy_sh).max() > 0.5 and (np.abs(copy - copy_sh) > 1e-4).mean() > 0.8
    for c in ("shuffle", "gauss"):
        assert [r["next"]["blind"]["logp"] for r in recs] == [r["next"][f"blind.{c}"]["logp"] for r in recs]


# -- the verdict ------------------------------------------------------------------------------------------
class TargetLogitsReadout:
    """A synthetic readout: the target's own logits, rebuilt from its last-layer features (final norm applied),
    plus `bonus` nats on the gold token. Fed other features, it reads those."""

    block_size = 4

    def __init__(self, target, bonus=0.0):
        self.target_layer_ids = [target.config.num_hidden_layers - 1]
        self.bonus = bonus

    def read_logits(self, target, features, ids, n_prompt, modes):
        logits = target.lm_head(features[0, n_prompt - 1 : -1]).float()
        gold = ids[0, n_prompt:]
        logits[torch.arange(len(gold)), gold] += self.bonus
        return {m: (logits, block_reads(len(gold), self.block_size, [m])[1][m][1]) for m in modes}


def _greedy_tasks(target, tok, n=10, n_greedy=5, n_random=3):
    """Tasks whose references are a few task-specific characters, then the target's own greedy continuation
    of them (so the real features carry the answer, and another task's features do not), then characters it
    does not predict; every other task fails, the rest are solved."""
    rows, gen = [], torch.Generator().manual_seed(0)
    rand = lambda k: "".join(chr(97 + int(x)) for x in torch.randint(0, 26, (k,), generator=gen))  # noqa: E731
    for i in range(n):
        words, head = rand(12), rand(n_random)
        row = _task(
            f"g{i}", None, context=f"Rule {i}: {words[:6]} means {words[6:]}.", question=f"What is {words[:3]}?"
        )
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = torch.tensor([ids + tok(head, add_special_tokens=False)["input_ids"]])
        for _ in range(n_greedy):
            logits = target(ids).logits[0, -1]
            logits[:4] = -torch.inf  # no special tokens: the reference must re-tokenize to the same ids
            ids = torch.cat([ids, logits.argmax()[None, None]], 1)
        row["reference_answer"] = head + "".join(tok.decode([i]) for i in ids[0, -n_greedy:].tolist()) + rand(n_random)
        rows.append(row)
    return rows, {f"g{i}": i % 2 == 0 for i in range(n)}


@pytest.fixture(scope="module")
def greedy_tasks(pair):
    target, _, tok = pair
    rows, solved = _greedy_tasks(target, tok)
    return prepare_tasks(rows, tok, solved=solved, frame="bare")


@pytest.mark.parametrize("bonus,want", [(0.0, "equivalent"), (1.0, "draft_better"), (-1.0, "draft_worse")])
def test_synthetic_readouts_get_the_verdict_their_construction_implies(pair, greedy_tasks, bonus, want):
    target, _, _ = pair
    recs = diagnose(
        target,
        TargetLogitsReadout(target, bonus),
        greedy_tasks,
        modes=["next", "block"],
        controls=("shuffle", "gauss", "noise"),
    )
    v = summarize(recs, ["next", "block"], n_boot=300)["verdict"]
    assert v["gate_passed"] and all(g["ci95"][0] > 0 for g in v["vs_controls"].values())  # it reads the features
    assert v["verdict"] == want, v["because"]
    if want == "equivalent":
        assert v["mean_per_task_logp_diff"] == pytest.approx(0, abs=1e-5) and -0.1 < v["ci90"][0] <= v["ci90"][1] < 0.1
    b = v["beside"]
    assert b["first"]["n_tokens"] == len(greedy_tasks.tasks) and b["later"]["n_tokens"] == len(recs) - len(
        greedy_tasks.tasks
    )
    assert (
        b["failed"]["n_tasks"] == 5 and b["solved"]["n_tasks"] == 5 and b["interaction_failed_minus_solved"] is not None
    )


def test_a_readout_that_does_not_beat_its_controls_is_inconclusive(pair, greedy_tasks):
    target, _, _ = pair

    # target logits with a bonus, but computed from features it never reads: better than the target, yet no
    # better than itself fed garbage
    class Blind(TargetLogitsReadout):
        def read_logits(self, target, features, ids, n_prompt, modes):
            feats = target(ids, output_hidden_states=True).hidden_states[-1]
            return super().read_logits(target, feats, ids, n_prompt, modes)

    recs = diagnose(target, Blind(target, 3.0), greedy_tasks, modes=["next"], controls=("shuffle", "gauss"))
    v = summarize(recs, ["next"], n_boot=300)["verdict"]
    assert v["mean_per_task_logp_diff"] > 1 and v["ci95"][0] > 0  # it would have been draft_better
    assert (
        v["verdict"] == "inconclusive" and not v["gate_passed"] and "does not use the target features" in v["because"]
    )
    assert summarize(recs, ["next"], n_boot=300, margin=0.1)["verdict"]["rule"].startswith("per task")


def test_untrained_draft_init_is_inconclusive(pair, greedy_tasks):
    target, _, tok = pair
    tok = char_tokenizer()
    tok.mask_token = "<mask>"
    draft = resolve_draft("init", target, tok)  # what --draft init builds
    recs = diagnose(target, draft, greedy_tasks, modes=["next"], controls=("shuffle", "gauss"))
    v = summarize(recs, ["next"], n_boot=300)["verdict"]
    assert v["verdict"] == "inconclusive" and not v["gate_passed"], v["because"]


def test_no_controls_or_one_task_is_inconclusive(pair, greedy_tasks):
    target, _, _ = pair
    recs = diagnose(target, TargetLogitsReadout(target, 3.0), greedy_tasks, modes=["next"], controls=())
    assert summarize(recs, ["next"], n_boot=100)["verdict"]["verdict"] == "inconclusive"
    one = type(greedy_tasks)(greedy_tasks.tasks[:1])
    recs = diagnose(target, TargetLogitsReadout(target, 3.0), one, modes=["next"], controls=("shuffle",))
    assert summarize(recs, ["next"], n_boot=100)["verdict"]["verdict"] == "inconclusive"


def test_several_readouts_share_the_target_pass_and_score_as_alone(pair, greedy_tasks):
    target, draft, _ = pair
    other = tiny_draft(target, seed=9, mask_token_id=3)
    both = diagnose(target, {"a": draft, "b": other}, greedy_tasks, modes=["next"], controls=("shuffle", "gauss"))
    alone = diagnose(target, {"b": other}, greedy_tasks, modes=["next"], controls=("shuffle", "gauss"))
    for r, s in zip(both, alone):
        assert set(r["next"]) == {"a", "a.shuffle", "a.gauss", "b", "b.shuffle", "b.gauss"}
        for p in ("b", "b.shuffle", "b.gauss"):
            assert r["next"][p]["logp"] == pytest.approx(s["next"][p]["logp"], abs=1e-6)
    s = summarize(both, ["next"], n_boot=100)
    assert s["readouts"] == ["a", "b"] and set(s["verdicts"]) == {"a", "b"} and s["verdict"] is s["verdicts"]["a"]
    assert s["verdicts"]["b"]["strongest_control"] in {"shuffle", "gauss"}


# -- the command --------------------------------------------------------------------------------------
def test_cli_writes_tokens_summary_report_and_figures(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(json.dumps(r) + "\n" for r in [_task("t0", "tulip"), _task("t1", "12 and 3", "B", "b"), _task("t2")])
    )
    out = tmp_path / "out"
    argv = [
        "diagnose",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--tasks",
        str(tasks),
        "--out",
        str(out),
        "--solve-max-new-tokens",
        "4",
        "--n-boot",
        "100",
        "--controls",
        "shuffle,gauss,noise,random",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["n_tasks"] == 2 and s["n_skipped"] == 1 and s["n_tokens"] == len("tulip") + len("12 and 3")
    assert s["verdict"] in {"draft_better", "draft_worse", "equivalent", "inconclusive"}
    assert s["n_solved"] + s["n_failed"] == 2  # computed by greedy eval (both tasks have checks)
    assert s["answer_frame"]["mode"] == "framed" and sum(s["answer_frame"]["tasks_by_frame"].values()) == 2
    assert set(s["modes"]) == {"next", "block"}
    a = s["modes"]["next"]["all"]
    pathways = {"draft", "draft.shuffle", "draft.gauss", "draft.noise", "draft.random"}
    assert set(a["mean_logp"]) == {"target"} | pathways and len(a["mean_logp"]["draft"]["ci95"]) == 2
    assert "offset:1" in s["modes"]["block"] and "all|first" in s["modes"]["next"] and "all|later" in s["modes"]["next"]
    assert set(s["verdict_detail"]["vs_controls"]) == {
        "shuffle",
        "gauss",
        "noise",
    }  # random: a sanity row no rule reads
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) == s["n_tokens"] * 11  # target + 5 pathways x {next, block}
    assert {r["pathway"] for r in rows} == {"target"} | {f"{p}_{m}" for p in pathways for m in ("next", "block")}
    assert all(r["rank"] >= 1 and r["logp"] <= 0 for r in rows)
    report = (out / "report.md").read_text()
    assert (
        f"Command: `{shlex.join(['draftguide', *argv])}`" in report and s["verdict"] in report and "Because:" in report
    )
    for png in ("heatmap.png", "rank_by_offset.png", "by_bucket_next.png", "by_category_block.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report

    # a second run: references and solve status from the first run's greedy eval; next mode only, no controls
    res = out / "solve" / "results.jsonl"
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "diagnose",
                "--target",
                str(tiny_target_dir),
                "--draft",
                str(tiny_draft_dir),
                "--tasks",
                str(tasks),
                "--out",
                str(out2),
                "--modes",
                "next",
                "--no-controls",
                "--reference-from",
                str(res),
                "--solved-from",
                str(res),
                "--n-boot",
                "50",
            ]
        )
        == 0
    )
    s2 = json.loads((out2 / "summary.json").read_text())
    eval_rows = {r["task_id"]: r for r in map(json.loads, res.read_text().splitlines())}
    assert s2["n_tasks"] + s2["n_skipped"] == 3 and set(s2["modes"]) == {"next"}
    assert s2["verdict"] == "inconclusive"  # no controls: nothing to beat
    for r in map(json.loads, (out2 / "tokens.jsonl").read_text().splitlines()):
        assert r["solved"] == bool(eval_rows[r["task_id"]]["score"])
        assert r["pathway"] in {"target", "draft_next"}
        assert r["frame"] in {"reference", "bare"} and r["in_response"] in {True, None}  # the reference is the response


def test_cli_records_exactly_the_argv_it_ran(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in [_task("t0", "tulip"), _task("t1", "12 and 3", "B", "b")]))
    out = tmp_path / "out"
    argv = [
        "diagnose",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--tasks",
        str(tasks),
        "--out",
        str(out),
        "--no-solve",
        "--dtype",
        "fp32",
        "--draft-dtype",
        "bf16",
        "--device",
        "cpu",
        "--n-boot",
        "37",
        "--seed",
        "5",
        "--modes",
        "next",
        "--answer-frame",
        "bare",
        "--margin",
        "0.25",
        "--controls",
        "gauss",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["argv"] == ["draftguide", *argv] and s["command"] == shlex.join(["draftguide", *argv])
    assert (out / "command.txt").read_text().strip() == s["command"]
    assert (
        s["bootstrap"] == {"n_boot": 37, "seed": 5, "unit": "task"}
        and s["margin"] == 0.25
        and s["controls"] == ["gauss"]
    )
    assert s["settings"]["draft_dtype"] == "bf16" and s["answer_frame"]["mode"] == "bare"
    report = (out / "report.md").read_text()
    assert report.count(f"`{s['command']}`") >= 1 + len(list(out.glob("*.png")))  # the header and every figure caption
    from draftguide.reporting.report import write_report

    paper = write_report([out], tmp_path / "paper").read_text()
    assert f"`{s['command']}`" in paper


def test_cli_several_readouts_side_by_side(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    other = tmp_path / "other-draft"
    tiny_draft(tiny_target(), seed=5, mask_token_id=3).save_pretrained(other)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in [_task("t0", "tulip"), _task("t1", "12 and 3", "B", "b")]))
    out = tmp_path / "out"
    assert (
        main(
            [
                "diagnose",
                "--target",
                str(tiny_target_dir),
                "--drafts",
                f"{tiny_draft_dir},{other}",
                "--tasks",
                str(tasks),
                "--out",
                str(out),
                "--no-solve",
                "--n-boot",
                "30",
            ]
        )
        == 0
    ), capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    names = [tiny_draft_dir.name, "other-draft"]
    assert s["readouts"] == names and set(s["verdicts"]) == set(names)
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert sum(r["pathway"] == "target" for r in rows) == s["n_tokens"]  # one target pass for both
    assert {r["pathway"] for r in rows} == {"target"} | {
        f"{n}{c}_{m}" for n in names for c in ("", ".shuffle", ".gauss") for m in ("next", "block")
    }
    report = (out / "report.md").read_text()
    assert all(f"### `{n}`: **{s['verdicts'][n]}**" in report for n in names)
    assert (
        main(
            [
                "diagnose",
                "--target",
                str(tiny_target_dir),
                "--draft",
                str(other),
                "--drafts",
                str(other),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_cli_rejects_bad_modes(tmp_path, capsys):
    assert main(["diagnose", "--modes", "next,sideways", "--out", str(tmp_path)]) == 2
    assert "--modes" in capsys.readouterr().err
