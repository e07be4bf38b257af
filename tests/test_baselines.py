"""Baselines: Power Sampling's MH chain targets p^alpha; DoLa's contrast, layer choice and degenerate case."""

import itertools
import math

import pytest
import torch
from conftest import tiny_target

from draftguide.baselines import _Chain, dola_generate, mh_log_ratio, power_sample, relative_top_mask, token_logprobs
from draftguide.errors import DraftGuideError
from draftguide.guided import js_divergence
from draftguide.speculative import greedy_generate


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
    for _ in range(3):
        chain.set_suffix(chain.length, *chain.propose(chain.ids.shape[1], 4))
        for _ in range(6):
            outcomes.append(chain.mh_step(rng))
            logits = target(chain.ids).logits[0, chain.T0 - 1 : -1]
            lp, lq = token_logprobs(logits, chain.ids[0, chain.T0 :], 2.0)
            assert torch.allclose(chain.lp, lp, atol=1e-4) and torch.allclose(chain.lq, lq, atol=1e-4)
    assert any(outcomes) and not all(outcomes)  # both branches exercised


@torch.inference_mode()
def test_mh_kernel_leaves_p_alpha_invariant():
    """Brute force on a vocab-6 target, continuations of 2 tokens (36 states): the chain's kernel (uniform
    suffix start, proposal at temperature 1/alpha, our MH ratio) has p^alpha / Z as stationary law."""
    V, alpha = 6, 3.0
    t = tiny_target(vocab=V, seed=2)
    prompt = torch.tensor([[1, 4, 2]])
    seqs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [36, 2]
    logits = t(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)).logits[:, 2:4]  # [36, 2, V]
    lp, lq = token_logprobs(logits.reshape(-1, V), seqs.reshape(-1), alpha)
    lp, lq = lp.view(-1, 2).double(), lq.view(-1, 2).double()
    pi = torch.softmax(alpha * lp.sum(1), 0)

    def kernel(ratio):
        K = torch.zeros(len(seqs), len(seqs), dtype=torch.float64)
        for x, y in itertools.product(range(len(seqs)), repeat=2):
            for i in (0, 1):
                if i == 1 and seqs[x, 0] != seqs[y, 0]:
                    continue
                q = lq[y, i:].sum().exp()
                K[x, y] += 0.5 * q * min(1.0, math.exp(ratio(lp[y, i:], lq[y, i:], lp[x, i:], lq[x, i:])))
        return K + torch.diag(1 - K.sum(1))

    K = kernel(lambda *a: mh_log_ratio(alpha, *a))
    assert torch.allclose(pi @ K, pi, atol=1e-10)
    naive = kernel(lambda lpn, lqn, lpo, lqo: alpha * float(lpn.sum() - lpo.sum()))  # no proposal correction
    assert (pi @ naive - pi).abs().max() > 1e-3  # the check has power


def test_power_sample_growth_is_tempered_sampling_and_costs(target):
    ids = _prompt(6, seed=2)
    out, st = power_sample(target, ids, alpha=4.0, n_mcmc=0, block_size=5, max_new_tokens=12,
                           generator=torch.Generator().manual_seed(3))
    g, ref = torch.Generator().manual_seed(3), ids
    with torch.inference_mode():
        for _ in range(12):
            p = torch.softmax(4.0 * target(ref).logits[:, -1].float(), -1)
            ref = torch.cat([ref, torch.multinomial(p, 1, generator=g)], 1)
    assert out.tolist() == ref.tolist() and st.tokens_per_output_token == 1.0
    run = lambda: power_sample(target, ids, n_mcmc=3, block_size=4, max_new_tokens=12,  # noqa: E731
                               generator=torch.Generator().manual_seed(9))
    (a, sa), (b, _) = run(), run()
    assert a.tolist() == b.tolist() and sa.num_new_tokens == 12 and sa.proposals == 9
    assert sa.tokens_per_output_token > 1.0 and sa.sampled_tokens >= 12 + 9


def test_power_sample_stops(target):
    ids, stop = _prompt(6, seed=2), list(range(0, 96, 3))  # a third of the vocabulary ends the text
    for seed in range(3):
        out, st = power_sample(target, ids, n_mcmc=2, block_size=4, max_new_tokens=16, stop_token_ids=stop,
                               generator=torch.Generator().manual_seed(seed))
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
        prem = {j: out.logits[0, -1] if j == L else target.lm_head(target.model.norm(out.hidden_states[j][0, -1]))
                for j in candidates}
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
    from draftguide.baselines import sample_generate

    ids = _prompt(5, seed=6)
    greedy, _ = greedy_generate(target, ids, 10)
    cold, _ = sample_generate(target, ids, temperature=0.0, max_new_tokens=10)
    assert cold.tolist() == greedy.tolist()
    draw = lambda s: sample_generate(target, ids, temperature=2.0, max_new_tokens=10,  # noqa: E731
                                     generator=torch.Generator().manual_seed(s))[0].tolist()
    assert draw(1) == draw(1) != draw(2)
