"""Draft-guided decoding: the mix, its limits (beta 0 and 1), exact speculative guided greedy, controls."""

import math

import pytest
import torch

from conftest import mixed_acceptance_pair
from draftguide.decode.guided import guide, guided_generate, js_divergence, noise_logits
from draftguide.decode.speculative import greedy_generate
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import multi_block_hidden
from draftguide.modeling.targets import extract_features


@torch.inference_mode()
def reference_guided(target, draft, ids, beta, n, mix="logits"):
    """From scratch every step, no caches: a full target forward and the draft's k=1 readout of one block
    anchored at the last token (the many-anchor path). Returns (tokens, target argmax per step)."""
    t_arg = []
    for _ in range(n):
        out = target(ids, output_hidden_states=True)
        feats = extract_features(out.hidden_states, draft.target_layer_ids)
        h = multi_block_hidden(draft, target, feats, ids, torch.tensor([[ids.shape[1] - 1]]))  # [1, 1, B, d]
        d = draft.logits(h[:, 0, 1], target)  # [1, V]
        g, _ = guide(out.logits[:, -1], d, beta, mix=mix)
        t_arg.append(int(out.logits[0, -1].argmax()))
        ids = torch.cat([ids, g.argmax(-1, keepdim=True)], 1)
    return ids, t_arg


def _prompt(n, seed=0, vocab=90):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pair", ["qwen3_pair", "llama_pair"])
@pytest.mark.parametrize("mix", ["logits", "probs"])
def test_beta_zero_is_target_greedy(pair, mix, request):
    target, draft = request.getfixturevalue(pair)
    for n in (1, 17):
        ids = _prompt(n, seed=n)
        ref, _ = greedy_generate(target, ids, 20)
        for spec in (False, True):
            out, st = guided_generate(target, draft, ids, beta=0.0, max_new_tokens=20, mix=mix, speculative=spec)
            assert out.tolist() == ref.tolist()
            assert st.flips == [] and st.tokens == 20


@pytest.mark.parametrize("shared_head", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("mix", ["logits", "probs"])
def test_matches_uncached_reference(qwen3_pair, beta, mix, shared_head, monkeypatch):
    """beta=1 is decoding from the draft's k=1 readout alone; any beta equals the no-cache reference, both with
    one output-head call for target and draft and on the path with two (drafts with a scale or softcap)."""
    import draftguide.decode.guided as guided

    if not shared_head:
        monkeypatch.setattr(guided, "shared_head", lambda s, out: None)
    target, draft = qwen3_pair
    ids = _prompt(9, seed=3)
    ref, t_arg = reference_guided(target, draft, ids, beta, 16, mix)
    out, st = guided_generate(target, draft, ids, beta=beta, max_new_tokens=16, mix=mix)
    assert out.tolist() == ref.tolist()
    new = ref[0, 9:].tolist()
    assert [(f.index, f.target_token, f.guided_token) for f in st.flips] == [
        (i, a, b) for i, (a, b) in enumerate(zip(t_arg, new)) if a != b
    ]
    if beta == 1.0:
        assert st.flips, "an untrained draft must disagree with the target somewhere"
        plain, _ = greedy_generate(target, ids, 16)
        assert out.tolist() != plain.tolist()


def test_speculative_is_exact_token_by_token():
    """Several betas, both mixes, a stop token, the adaptive schedule, the guard and the noise control."""
    target, draft, ids = mixed_acceptance_pair()
    accepted = []
    cases = [dict(beta=b, mix=m) for b in (0.0, 0.2, 0.5, 0.8, 1.0) for m in ("logits", "probs")]
    cases += [dict(beta=0.7, beta_schedule="adaptive"), dict(beta=1.0, guard_top_k=3), dict(beta=0.6, control="noise")]
    for kw in cases:
        ref, rst = guided_generate(target, draft, ids, max_new_tokens=50, **kw)
        out, st = guided_generate(target, draft, ids, max_new_tokens=50, speculative=True, **kw)
        assert out.tolist() == ref.tolist(), kw
        assert st.flips == rst.flips and sum(st.acceptance_lengths) + 1 == st.num_new_tokens == 50
        accepted += st.acceptance_lengths
        stop = [int(ref[0, ids.shape[1] + 11])]
        ref_s, _ = guided_generate(target, draft, ids, max_new_tokens=50, stop_token_ids=stop, **kw)
        out_s, _ = guided_generate(target, draft, ids, max_new_tokens=50, stop_token_ids=stop, speculative=True, **kw)
        assert out_s.tolist() == ref_s.tolist() and int(out_s[0, -1]) == stop[0], kw
    assert max(accepted) >= 3  # the check has power: multi-token steps happened


def test_speculative_exact_on_qwen3_pair_and_short_prompts(qwen3_pair):
    target, draft = qwen3_pair
    for n, beta, new in ((1, 0.5, 12), (6, 0.9, 1), (6, 0.9, 2), (30, 1.0, 33)):
        ids = _prompt(n, seed=n)
        ref, _ = guided_generate(target, draft, ids, beta=beta, max_new_tokens=new)
        out, _ = guided_generate(target, draft, ids, beta=beta, max_new_tokens=new, speculative=True)
        assert out.tolist() == ref.tolist()


def test_guard_top1_keeps_target_greedy(qwen3_pair):
    target, draft = qwen3_pair
    ids = _prompt(8, seed=5)
    ref, _ = greedy_generate(target, ids, 15)
    out, st = guided_generate(target, draft, ids, beta=1.0, max_new_tokens=15, guard_top_k=1)
    assert out.tolist() == ref.tolist() and st.flips == []


def test_js_and_adaptive_beta():
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    assert torch.allclose(js_divergence(a, a), torch.zeros(3), atol=1e-6)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-6)
    disjoint = js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-4)
    g, betas = guide(a, b, 0.8, beta_schedule="adaptive")
    expect = 0.8 * js_divergence(a, b) / math.log(2)
    assert torch.allclose(betas, expect) and (betas <= 0.8).all() and (betas > 0).all()
    assert torch.allclose(g, (1 - expect[:, None]) * a + expect[:, None] * b)
    g, betas = guide(a, a, 0.8, beta_schedule="adaptive")
    assert torch.allclose(g, a, atol=1e-5)  # identical distributions: no guidance


def test_mix_rules_differ_where_they_should():
    """`probs` is the mixture of the two distributions, `logits` the product of experts; they differ in
    between and agree at beta 0 (the target's logits themselves) and beta 1 (the draft's distribution).
    A mix of log-softmaxes (the refused `logprobs`) is `logits` again: same distribution, which is why it went."""
    g = torch.Generator().manual_seed(0)
    t, d = 3 * torch.randn(4, 50, generator=g), 3 * torch.randn(4, 50, generator=g)
    pt, pd = torch.softmax(t, -1), torch.softmax(d, -1)
    for b in (0.25, 0.5, 0.9):
        lo, _ = guide(t, d, b, mix="logits")
        pr, _ = guide(t, d, b, mix="probs")
        assert torch.allclose(torch.softmax(pr, -1), (1 - b) * pt + b * pd, atol=1e-6)
        assert torch.allclose(pr.exp().sum(-1), torch.ones(4), atol=1e-5)  # log-probabilities
        assert torch.allclose(torch.softmax(lo, -1), torch.softmax((1 - b) * t + b * d, -1), atol=1e-6)
        assert (torch.softmax(lo, -1) - torch.softmax(pr, -1)).abs().max() > 0.05
        old = (1 - b) * torch.log_softmax(t, -1) + b * torch.log_softmax(d, -1)
        assert torch.allclose(torch.softmax(old, -1), torch.softmax(lo, -1), atol=1e-5)
    for mix in ("logits", "probs"):
        assert torch.equal(guide(t, d, 0.0, mix=mix)[0], t)
        assert torch.allclose(torch.softmax(guide(t, d, 1.0, mix=mix)[0], -1), pd, atol=1e-6)
    # the argmax itself can differ: the target is sure of token 0, the draft rules it out
    t1, d1 = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[-10.0, 1.0, 0.0]])
    assert guide(t1, d1, 0.5, mix="logits")[0].argmax().item() == 1
    assert guide(t1, d1, 0.5, mix="probs")[0].argmax().item() == 0
    # per-row beta (adaptive) and the guard work with the mixture too
    pr, betas = guide(t, d, 0.8, mix="probs", beta_schedule="adaptive")
    bb = betas[:, None]
    assert torch.allclose(torch.softmax(pr, -1), (1 - bb) * pt + bb * pd, atol=1e-6)
    pr, _ = guide(t, d, 0.5, mix="probs", guard_top_k=3)
    assert ((pr > float("-inf")).sum(-1) == 3).all() and (pr.argmax(-1)[:, None] == t.topk(3).indices).any(-1).all()
    with pytest.raises(DraftGuideError, match="use mix 'probs'"):
        guide(t, d, 0.5, mix="logprobs")


def test_noise_control_statistics_and_seeding(qwen3_pair):
    d = torch.randn(2, 20000) * torch.tensor([[2.0], [0.5]]) + torch.tensor([[1.0], [-3.0]])
    z = noise_logits(d, torch.tensor([5, 6]), seed=0)
    assert torch.allclose(z.mean(-1), d.mean(-1), atol=0.05) and torch.allclose(z.std(-1), d.std(-1), rtol=0.03)
    assert torch.equal(z, noise_logits(d, torch.tensor([5, 6]), seed=0))
    assert not torch.equal(z, noise_logits(d, torch.tensor([5, 6]), seed=1))
    target, draft = qwen3_pair
    ids = _prompt(8, seed=2)

    def run(seed):
        return guided_generate(
            target,
            draft,
            ids,
            beta=0.9,
            max_new_tokens=24,
            control="noise",
            generator=torch.Generator().manual_seed(seed),
        )[0].tolist()

    guided, _ = guided_generate(target, draft, ids, beta=0.9, max_new_tokens=24)
    assert run(3) == run(3) != run(4)
    assert run(3) != guided.tolist()


def test_streaming_and_sampling(qwen3_pair):
    target, draft = qwen3_pair
    ids = _prompt(7, seed=4)
    for spec in (False, True):
        seen = []
        out, _ = guided_generate(
            target, draft, ids, beta=0.5, max_new_tokens=18, speculative=spec, on_token=seen.append
        )
        assert seen == out[0, 7:].tolist()
    greedy, _ = guided_generate(target, draft, ids, beta=0.5, max_new_tokens=18)
    top1, _ = guided_generate(target, draft, ids, beta=0.5, max_new_tokens=18, temperature=1.0, top_k=1)
    assert top1.tolist() == greedy.tolist()

    def draw():
        return guided_generate(
            target,
            draft,
            ids,
            beta=0.5,
            max_new_tokens=18,
            temperature=1.5,
            generator=torch.Generator().manual_seed(0),
        )[0].tolist()

    assert draw() == draw() != greedy.tolist()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(beta=1.5), "beta must be in"),
        (dict(beta=float("nan")), "beta must be in"),
        (dict(beta=0.5, mix="logprobs"), "decoded exactly like mix 'logits'.*use mix 'probs'"),
        (dict(beta=0.5, mix="mean"), "mix must be"),
        (dict(beta=0.5, beta_schedule="cosine"), "beta_schedule"),
        (dict(beta=0.5, guard_top_k=0), "guard_top_k"),
        (dict(beta=0.5, control="zeros"), "control must be"),
        (dict(beta=0.5, speculative=True, temperature=0.7), "greedy decoding only"),
        (dict(beta=0.5, max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_input(qwen3_pair, kw, msg):
    target, draft = qwen3_pair
    kw = {"max_new_tokens": 4} | kw
    with pytest.raises(DraftGuideError, match=msg):
        guided_generate(target, draft, _prompt(4), **kw)


def test_adapted_draft_from_ttt(qwen3_pair):
    """An `AdaptedDraft` from `ttt_adapt` is a draft like any other: guided decoding runs with it, exactly
    (speculative == token by token), it changes what guidance does, and reset() gives the base back."""
    from draftguide.training.ttt import ttt_adapt

    target, draft = qwen3_pair
    ids = _prompt(40, seed=8)
    base, _ = guided_generate(target, draft, ids, beta=1.0, max_new_tokens=16)
    adapted = ttt_adapt(draft, target, ids, steps=4, lr=5e-2, rank=4, anchors_per_step=8)
    out, st = guided_generate(target, adapted, ids, beta=1.0, max_new_tokens=16)
    spec, _ = guided_generate(target, adapted, ids, beta=1.0, max_new_tokens=16, speculative=True)
    assert spec.tolist() == out.tolist() and out.tolist() != base.tolist()
    assert adapted.reset() is draft
    again, _ = guided_generate(target, draft, ids, beta=1.0, max_new_tokens=16)
    assert again.tolist() == base.tolist()


@pytest.mark.slow
def test_default_pair_end_to_end():
    """SmolLM2-135M with its shipped draft on two built-in tasks: beta 0 is greedy, the speculative path is
    exact at beta 0.5, and guidance flips some tokens at beta 1."""
    from draftguide.experiments.evaluate import load_tasks
    from draftguide.modeling.draft_io import resolve_draft
    from draftguide.modeling.prompts import encode_prompt, stop_token_ids
    from draftguide.modeling.targets import load_target

    target, tok = load_target("smollm2-135m")
    draft = resolve_draft(None, target, tok, target_name="smollm2-135m")
    stop = stop_token_ids(tok, target)
    for task in load_tasks("builtin")[0][:2]:
        ids = encode_prompt(tok, task)
        ref, _ = greedy_generate(target, ids, 24, stop)
        out, _ = guided_generate(target, draft, ids, beta=0.0, max_new_tokens=24, stop_token_ids=stop)
        assert out.tolist() == ref.tolist()
        tbt, _ = guided_generate(target, draft, ids, beta=0.5, max_new_tokens=24, stop_token_ids=stop)
        spec, _ = guided_generate(
            target, draft, ids, beta=0.5, max_new_tokens=24, stop_token_ids=stop, speculative=True
        )
        assert spec.tolist() == tbt.tolist()
        _, st = guided_generate(target, draft, ids, beta=1.0, max_new_tokens=24, stop_token_ids=stop)
        assert st.flips


def test_speculative_verify_len_changes_speed_not_tokens():
    """Fewer verified tokens per step (cheaper on a CPU) give the same tokens; steps never commit more than
    verify_len + 1; a bad verify_len is refused."""
    target, draft, ids = mixed_acceptance_pair()
    ref, _ = guided_generate(target, draft, ids, beta=0.6, max_new_tokens=40)
    longest = {}
    for v in range(1, draft.block_size):
        out, st = guided_generate(target, draft, ids, beta=0.6, max_new_tokens=40, speculative=True, verify_len=v)
        assert out.tolist() == ref.tolist(), v
        longest[v] = max(st.acceptance_lengths)
        assert longest[v] <= v + 1
    assert longest[1] == 2 and longest[draft.block_size - 1] > 2  # both bounds are reached: the check has power
    for kw, msg in (
        (dict(verify_len=2), "speculative"),
        (dict(verify_len=0, speculative=True), "verify_len"),
        (dict(verify_len=draft.block_size, speculative=True), "verify_len"),
    ):
        with pytest.raises(DraftGuideError, match=msg):
            guided_generate(target, draft, ids, beta=0.5, max_new_tokens=4, **kw)


def test_bf16_draft_beside_fp32_target(qwen3_pair):
    """A draft run in bf16 next to an fp32 target (`draft_dtype`): speculative decoding stays lossless,
    speculative guided stays equal to token-by-token guided, and the readout differs only by bf16 rounding."""
    import copy

    from draftguide.decode.speculative import speculative_generate

    target, draft = qwen3_pair
    mt, md, mids = mixed_acceptance_pair()  # a pair that accepts multi-token blocks: the check has power
    m16 = copy.deepcopy(md).to(torch.bfloat16)
    plain, _ = greedy_generate(mt, mids, 40)
    out, st = speculative_generate(mt, m16, mids, 40)
    assert out.tolist() == plain.tolist() and max(st.acceptance_lengths) > 2
    d16 = copy.deepcopy(draft).to(torch.bfloat16)
    ids = _prompt(12, seed=5)
    for beta in (0.5, 1.0):
        ref, _ = guided_generate(mt, m16, mids, beta=beta, max_new_tokens=40)
        out, st = guided_generate(mt, m16, mids, beta=beta, max_new_tokens=40, speculative=True, verify_len=3)
        assert out.tolist() == ref.tolist() and max(st.acceptance_lengths) > 1
    with torch.inference_mode():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
        anchors = torch.tensor([[3, 8]])
        h32 = draft.logits(multi_block_hidden(draft, target, feats, ids, anchors), target)
        h16 = d16.logits(multi_block_hidden(d16, target, feats, ids, anchors), target)
    assert h16.dtype == torch.float32 and not torch.equal(h16, h32)  # the bf16 draft really ran, head in fp32
    torch.testing.assert_close(h16, h32, atol=0.1, rtol=0.05)


def test_speculative_without_a_shared_head_call(monkeypatch):
    """Drafts with their own output scale take the two-head-call path in speculative guided decoding too:
    same tokens as token-by-token decoding on the shared-call path."""
    from draftguide.decode import guided

    target, draft, ids = mixed_acceptance_pair()
    refs = {b: guided_generate(target, draft, ids, beta=b, max_new_tokens=40)[0] for b in (0.5, 1.0)}
    calls = []
    monkeypatch.setattr(guided, "shared_head", lambda s, out: calls.append(1))  # always None
    for b, ref in refs.items():
        out, st = guided_generate(target, draft, ids, beta=b, max_new_tokens=40, speculative=True, verify_len=4)
        assert out.tolist() == ref.tolist() and max(st.acceptance_lengths) > 1
    assert calls
