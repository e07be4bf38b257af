"""Baselines: Power Sampling's MH chain targets p^alpha; DoLa's contrast, layer choice and degenerate case."""

import itertools
import math

import pytest
import torch

from conftest import tiny_target
from draftguide.decode.baselines import (
    POWER_PRESETS,
    _Chain,
    block_ends,
    dola_generate,
    mh_log_ratio,
    power_sample,
    relative_top_mask,
    token_logprobs,
)
from draftguide.decode.guided import js_divergence
from draftguide.decode.speculative import greedy_generate
from draftguide.errors import DraftGuideError


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=5)


def _prompt(n, seed=0, vocab=90):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_chain_logprobs_stay_consistent_through_rejections(target):
    """After growth and many accepted/rejected suffix proposals (which leave stale cache entries), the
    per-token log p / log q the chain keeps equal those of a fresh full forward over its sequence."""
    ids = _prompt(5, seed=1)
    chain = _Chain(target, ids, 2.0, set(), torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    outcomes = []
    for limit in (4, 8, 12):
        chain.grow(limit)
        for _ in range(6):
            outcomes.append(chain.mh_step(rng, limit))
            logits = target(chain.ids).logits[0, chain.T0 - 1 : -1]
            lp, lq = token_logprobs(logits, chain.ids[0, chain.T0 :], 2.0)
            assert torch.allclose(chain.lp, lp, atol=1e-4) and torch.allclose(chain.lq, lq, atol=1e-4)
    assert any(outcomes) and not all(outcomes)  # both branches exercised


@torch.inference_mode()
def test_chain_with_stop_tokens_proposes_up_to_the_limit():
    """With stop tokens the continuation's length changes: every MH proposal from offset i may run to the
    block's limit (limit - i tokens), so a continuation cut short by a stop can grow back, and accepted
    moves both shorten and lengthen it; the stored log p / log q stay those of the sequence."""
    t = tiny_target(vocab=8, seed=4, layers=2)
    chain = _Chain(t, torch.tensor([[1, 5, 2]]), 2.0, {0, 3}, torch.Generator().manual_seed(0))
    calls, real = [], chain.propose
    chain.propose = lambda a, n: calls.append((a - chain.T0, n)) or real(a, n)
    rng, limit, lengths = torch.Generator().manual_seed(2), 5, []
    chain.grow(limit)
    for _ in range(300):
        calls.clear()
        before = chain.length
        accepted = chain.mh_step(rng, limit)
        ((i, n),) = calls
        assert 0 <= i < before and n == limit - i
        ends_in_stop = int(chain.ids[0, -1]) in chain.stop
        assert chain.length == limit or ends_in_stop  # always a complete continuation
        assert not set(chain.ids[0, chain.T0 : -1].tolist()) & chain.stop  # a stop only at the end
        if accepted:
            lengths.append((before, chain.length))
    logits = t(chain.ids).logits[0, chain.T0 - 1 : -1]
    lp, lq = token_logprobs(logits, chain.ids[0, chain.T0 :], 2.0)
    assert torch.allclose(chain.lp, lp, atol=1e-4) and torch.allclose(chain.lq, lq, atol=1e-4)
    assert any(b < a for a, b in lengths) and any(b > a for a, b in lengths)  # the check has power


def _chain_states(V: int, N: int, stop: set[int]) -> list[tuple[int, ...]]:
    """Every continuation the chain can hold at limit N: a stop token only at the end, and shorter than N
    only when it ends at a stop."""
    return [
        seq
        for L in range(1, N + 1)
        for seq in itertools.product(range(V), repeat=L)
        if not set(seq[:-1]) & stop and (L == N or seq[-1] in stop)
    ]


@pytest.mark.parametrize("stop", [set(), {0}, {0, 2}])
@torch.inference_mode()
def test_mh_kernel_leaves_p_alpha_invariant(stop):
    """Brute force on a vocab-4 target, every continuation of at most 3 tokens the chain can hold (with stop
    tokens: variable lengths): the kernel of `_Chain.mh_step` (offset i uniform among the L tokens, proposal
    at temperature 1/alpha from i until a stop or the limit, `mh_log_ratio`) has p^alpha / Z as stationary law."""
    V, N, alpha = 4, 3, 3.0
    t = tiny_target(vocab=V, seed=2)
    prompt = [1, 3, 2]
    states = _chain_states(V, N, stop)
    lp, lq = {}, {}
    for x in states:
        logits = t(torch.tensor([prompt + list(x)])).logits[0, len(prompt) - 1 : -1]
        a, b = token_logprobs(logits, torch.tensor(x), alpha)
        lp[x], lq[x] = a.double(), b.double()
    pi = torch.softmax(torch.tensor([alpha * float(lp[x].sum()) for x in states], dtype=torch.float64), 0)
    index = {x: k for k, x in enumerate(states)}

    def kernel(ratio):
        K = torch.zeros(len(states), len(states), dtype=torch.float64)
        for x in states:
            L = len(x)
            for i in range(L):
                ys = [y for y in states if len(y) > i and y[:i] == x[:i]]  # every proposal from offset i
                mass = sum(float(lq[y][i:].sum().exp()) for y in ys)
                assert abs(mass - 1) < 1e-6  # the proposal's support is exactly these states (float32 log q)
                for y in ys:
                    q = float(lq[y][i:].sum().exp())
                    r = ratio(i, lp[y][i:], lq[y][i:], lp[x][i:], lq[x][i:])
                    K[index[x], index[y]] += q / L * min(1.0, math.exp(min(r, 50.0)))
        return K + torch.diag(1 - K.sum(1))

    K = kernel(lambda *a: mh_log_ratio(alpha, *a))
    assert torch.allclose(pi @ K, pi, atol=1e-12)
    naive = kernel(lambda i, lpn, lqn, lpo, lqo: alpha * float(lpn.sum() - lpo.sum()))  # no proposal correction
    assert (pi @ naive - pi).abs().max() > 1e-3  # the check has power
    if stop:  # with variable lengths the 1/L vs 1/L' of choosing the offset matters too
        no_index = kernel(
            lambda i, lpn, lqn, lpo, lqo: (
                mh_log_ratio(alpha, i, lpn, lqn, lpo, lqo) - math.log((i + len(lpo)) / (i + len(lpn)))
            )
        )
        assert (pi @ no_index - pi).abs().max() > 1e-4


def test_block_ends_split_max_new_tokens_like_the_reference():
    assert block_ends(48, 16) == list(range(3, 49, 3))  # the reference: max_new_tokens // block_num per block
    assert block_ends(10, 4) == [2, 5, 7, 10] and block_ends(3, 16) == [1, 2, 3]
    assert POWER_PRESETS["paper"] == {"alpha": 4.0, "block_num": 16, "mcmc_steps": 10}


def test_power_sample_growth_is_tempered_sampling_and_costs(target):
    ids = _prompt(6, seed=2)
    out, st = power_sample(
        target, ids, alpha=4.0, mcmc_steps=0, block_num=3, max_new_tokens=12, generator=torch.Generator().manual_seed(3)
    )
    g, ref = torch.Generator().manual_seed(3), ids
    with torch.inference_mode():
        for _ in range(12):
            p = torch.softmax(4.0 * target(ref).logits[:, -1].float(), -1)
            ref = torch.cat([ref, torch.multinomial(p, 1, generator=g)], 1)
    assert out.tolist() == ref.tolist() and st.tokens_per_output_token == 1.0

    def run():
        return power_sample(
            target,
            ids,
            mcmc_steps=3,
            block_num=3,
            max_new_tokens=12,
            generator=torch.Generator().manual_seed(9),
        )

    (a, sa), (b, _) = run(), run()
    assert a.tolist() == b.tolist() and sa.num_new_tokens == 12 and sa.proposals == 9
    assert sa.tokens_per_output_token > 1.0 and sa.sampled_tokens >= 12 + 9
    _, paper = power_sample(target, ids, max_new_tokens=16, generator=torch.Generator().manual_seed(1))
    assert (paper.block_num, paper.mcmc_steps, paper.alpha) == (16, 10, 4.0) and paper.proposals == 160
    # each MH step after block k resamples a suffix of the k tokens so far: about (k + 1) / 2 tokens
    assert 16 + 10 * sum((k + 1) / 2 for k in range(1, 17)) * 0.8 < paper.sampled_tokens < 16 + 10 * 16 * 17 / 2


def test_power_sample_stops(target):
    ids, stop = _prompt(6, seed=2), list(range(0, 96, 3))  # a third of the vocabulary ends the text
    for seed in range(3):
        out, st = power_sample(
            target,
            ids,
            mcmc_steps=2,
            block_num=4,
            max_new_tokens=16,
            stop_token_ids=stop,
            generator=torch.Generator().manual_seed(seed),
        )
        new = out[0, 6:].tolist()
        assert new[-1] in stop and not set(new[:-1]) & set(stop) and st.num_new_tokens == len(new) < 16


@torch.inference_mode()
def reference_dola(target, ids, candidates, relative_top, n):
    """From scratch, no cache: final norm + lm_head on each candidate layer's last state."""
    L = target.config.num_hidden_layers
    layers = []
    for _ in range(n):
        out = target(ids, output_hidden_states=True)
        final = torch.log_softmax(out.logits[0, -1], -1)
        prem = {
            j: out.logits[0, -1] if j == L else target.lm_head(target.model.norm(out.hidden_states[j][0, -1]))
            for j in candidates
        }
        js = {j: float(js_divergence(out.logits[0, -1], v)) for j, v in prem.items()}
        m = max(candidates, key=lambda j: js[j])  # first maximum, as torch.argmax
        s = final if m == L else final - torch.log_softmax(prem[m], -1)
        s = s.masked_fill(final < final.max() + math.log(relative_top), float("-inf"))
        layers.append(m)
        ids = torch.cat([ids, s.argmax().view(1, 1)], 1)
    return ids, layers


def test_dola_matches_reference_and_final_layer_is_greedy(target):
    ids = _prompt(7, seed=4)
    cands = [0, 2, 4]
    ref, layers = reference_dola(target, ids, cands, 1e-3, 14)
    out, st = dola_generate(target, ids, candidate_layers=cands, relative_top=1e-3, max_new_tokens=14)
    assert out.tolist() == ref.tolist() and st.premature_layers == layers
    greedy, _ = greedy_generate(target, ids, 14)
    assert out.tolist() != greedy.tolist()  # the contrast changes something on this model
    L = target.config.num_hidden_layers
    only_final, st = dola_generate(target, ids, candidate_layers=[L], max_new_tokens=14)
    assert only_final.tolist() == greedy.tolist() and set(st.premature_layers) == {L}


def test_relative_top_mask_keeps_plausible_tokens():
    lp = torch.log_softmax(torch.tensor([[3.0, 2.9, 0.0, -5.0]]), -1)
    assert relative_top_mask(lp, 0.1).tolist() == [[False, False, True, True]]
    assert relative_top_mask(lp, 0.999).tolist() == [[False, True, True, True]]


def test_bad_input(target):
    ids = _prompt(4)
    with pytest.raises(DraftGuideError, match="alpha"):
        power_sample(target, ids, alpha=0.5, max_new_tokens=4)
    with pytest.raises(DraftGuideError, match="candidate layers"):
        dola_generate(target, ids, candidate_layers=[99], max_new_tokens=4)
    with pytest.raises(DraftGuideError, match="relative_top"):
        dola_generate(target, ids, relative_top=0.0, max_new_tokens=4)


def test_sample_generate(target):
    from draftguide.decode.baselines import sample_generate

    ids = _prompt(5, seed=6)
    greedy, _ = greedy_generate(target, ids, 10)
    cold, _ = sample_generate(target, ids, temperature=0.0, max_new_tokens=10)
    assert cold.tolist() == greedy.tolist()

    def draw(s):
        return sample_generate(
            target,
            ids,
            temperature=2.0,
            max_new_tokens=10,
            generator=torch.Generator().manual_seed(s),
        )[0].tolist()

    assert draw(1) == draw(1) != draw(2)
