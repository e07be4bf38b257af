"""Speculative decoding is lossless: greedy equals the target's greedy; sampling keeps its distribution."""

import pytest
import torch

from conftest import mixed_acceptance_pair, tiny_target
from draftguide.decode.speculative import greedy_generate, hf_generate, speculative_generate
from draftguide.errors import DraftGuideError
from draftguide.modeling.sampling import probs_from_logits, rejection_sample


@pytest.mark.parametrize("pair", ["llama_pair", "qwen3_pair"])
def test_greedy_lossless_against_hf_generate(pair, request):
    target, draft = request.getfixturevalue(pair)
    g = torch.Generator().manual_seed(7)
    for n in (1, 23):
        ids = torch.randint(0, 90, (1, n), generator=g)
        ref, _ = hf_generate(target, ids, 24)
        ours, st = speculative_generate(target, draft, ids, 24)
        assert ours.tolist() == ref.tolist()
        assert sum(st.acceptance_lengths) + 1 == st.num_new_tokens == 24
        plain, _ = greedy_generate(target, ids, 24)
        assert plain.tolist() == ref.tolist()


def test_greedy_lossless_with_multi_token_acceptance_and_stop():
    target, draft, ids = mixed_acceptance_pair()
    ref, _ = hf_generate(target, ids, 60)
    for verify_len in (None, 1, 3):
        ours, st = speculative_generate(target, draft, ids, 60, verify_len=verify_len)
        assert ours.tolist() == ref.tolist()
        assert max(st.acceptance_lengths) <= (verify_len or draft.block_size - 1) + 1
    stop = [int(ref[0, ids.shape[1] + 7])]
    ref_stop, _ = hf_generate(target, ids, 60, stop_token_ids=stop)
    ours_stop, _ = speculative_generate(target, draft, ids, 60, stop_token_ids=stop)
    assert ours_stop.tolist() == ref_stop.tolist()
    assert int(ours_stop[0, -1]) == stop[0]


def test_rejection_sample_preserves_target_distribution():
    """One proposal from q, accepted w.p. min(1, p/q), else a draw from (p - q)+: the committed token ~ p."""
    torch.manual_seed(0)
    V, N = 6, 40000
    p = torch.softmax(torch.randn(2, V) * 1.5, -1)
    q = torch.softmax(torch.randn(1, V) * 1.5, -1)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(N):
        tok = torch.multinomial(q[0], 1, generator=g)
        acc, nxt = rejection_sample(tok, p, q, g)
        counts[int(tok) if acc == 1 else int(nxt)] += 1
    emp = counts / N
    assert (emp - p[0]).abs().max() < 0.012  # ~5 sigma at N = 40k
    # the check has power: committing the draft's token unconditionally would fail it
    assert (q[0] - p[0]).abs().max() > 0.05


def test_sampling_distribution_equals_target_end_to_end():
    """Tokens 2 and 3 (produced by a verify step) follow the target's sampling distribution exactly:
    compare the empirical joint of (t1, t2, t3) marginals against enumeration of the target."""
    target, draft, ids = mixed_acceptance_pair()
    temp, N = 1.0, 600
    V = target.config.vocab_size
    with torch.no_grad():
        p1 = probs_from_logits(target(ids).logits[0, -1], temp)  # [V]
        seqs = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = probs_from_logits(target(seqs).logits[:, -1], temp)  # [V, V]: p(t2 | t1)
    exact_t2 = (p1[:, None] * p2).sum(0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(N):
        out, _ = speculative_generate(target, draft, ids, 2, temperature=temp, generator=g)
        counts[int(out[0, -1])] += 1
    emp = counts / N
    # chi-square over cells with expected count >= 5, the rest lumped into one cell
    expected = N * exact_t2
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2) / exp)[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof, emp, exact_t2)  # ~p < 1e-4 under the null
    # and no single token's frequency is far off
    assert (emp - exact_t2).abs().max() < 0.08


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_arguments(qwen3_pair, kwargs, message):
    target, draft = qwen3_pair
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(DraftGuideError, match=message):
        speculative_generate(target, draft, torch.tensor([[1, 2, 3]]), **args)


def test_empty_prompt_rejected(qwen3_pair):
    target, draft = qwen3_pair
    with pytest.raises(DraftGuideError, match="empty prompt"):
        speculative_generate(target, draft, torch.zeros((1, 0), dtype=torch.long), 4)


def test_mismatched_draft_rejected(qwen3_pair):
    _, draft = qwen3_pair
    other = tiny_target(layers=4)  # draft reads layer 4, which a 4-layer target lacks
    with pytest.raises(DraftGuideError, match="out of range"):
        speculative_generate(other, draft, torch.tensor([[1, 2]]), 4)


def test_adaptive_verify_is_lossless_and_picks_by_cost():
    from draftguide.decode.speculative import best_verify_len

    target, draft, ids = mixed_acceptance_pair()
    ref, _ = hf_generate(target, ids, 60)
    flat = [1.0] * (draft.block_size + 1)  # verifying costs nothing extra: verify everything
    ours, st = speculative_generate(target, draft, ids, 60, verify_costs=flat)
    assert ours.tolist() == ref.tolist()
    steep = [1.0 + 10.0 * n for n in range(draft.block_size + 1)]  # every extra token is expensive: verify one
    ours, st = speculative_generate(target, draft, ids, 60, verify_costs=steep)
    assert ours.tolist() == ref.tolist() and max(st.acceptance_lengths) <= 2
    # a confident draft earns a longer verify at the same moderate cost curve than an unsure one
    V = 50
    sure = torch.full((7, V), -20.0)
    sure[:, 0] = 20.0
    unsure = torch.zeros((7, V))
    moderate = [1.0 + 0.1 * n for n in range(8)]
    assert best_verify_len(sure, moderate) == 7 and best_verify_len(unsure, moderate) == 1


def test_adaptive_verify_counts_the_price_of_reading_the_draft():
    """With read costs, auto verification reads only the offsets worth their cost, judged from the
    acceptance seen so far: an expensive head means one proposal per step, a free one the old behaviour;
    both lossless."""
    from draftguide.decode.speculative import AcceptanceRates, measure_read_costs

    target, draft, ids = mixed_acceptance_pair()
    ref, _ = hf_generate(target, ids, 60)
    flat = [1.0] * (draft.block_size + 1)
    out, st = speculative_generate(
        target, draft, ids, 60, verify_costs=flat, read_costs=[10.0 * n for n in range(1, 8)]
    )
    assert out.tolist() == ref.tolist() and max(st.acceptance_lengths) == 2
    out, free = speculative_generate(target, draft, ids, 60, verify_costs=flat, read_costs=[0.0] * 7)
    _, old = speculative_generate(target, draft, ids, 60, verify_costs=flat)
    assert (
        out.tolist() == ref.tolist()
        and free.acceptance_lengths == old.acceptance_lengths
        and max(free.acceptance_lengths) > 2
    )

    costs, read = [1.0 + 0.1 * n for n in range(9)], [0.05 * n for n in range(1, 8)]
    rates = AcceptanceRates(7)
    assert rates.rows_worth_reading(costs, read, 7) == 7  # optimistic start: unseen offsets get tried
    for _ in range(40):
        rates.update(0, 7)  # the first proposal always rejected
    assert rates.rows_worth_reading(costs, read, 7) == 1
    for _ in range(200):
        rates.update(7, 7)  # then every proposal accepted: reading the whole block pays again
    assert rates.rows_worth_reading(costs, read, 7) == 7
    rates = AcceptanceRates(3)
    rates.update(1, 3)  # offset 1 accepted, offset 2 rejected, offset 3 never reached
    assert rates.hits == [2.0, 1.0, 1.0] and rates.tries == [2.0, 2.0, 1.0]
    read_costs = measure_read_costs(target, draft, repeats=1)
    assert len(read_costs) == draft.block_size - 1 and min(read_costs) > 0
