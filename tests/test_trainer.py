"""The training loop's pieces one at a time (schedule, time budget, data order, state, checkpoint, step, export),
on tiny random targets and hand-made samples; `test_train.py` checks the loop end to end."""

import math
import os
import random
import signal

import pytest
import torch

from conftest import char_tokenizer, tiny_target
from draftguide.modeling.draft_io import load_draft
from draftguide.modeling.targets import extract_features
from draftguide.training.train import (
    IGNORE,
    TrainConfig,
    build_run,
    export_draft,
    nominal_total,
    subset_head,
    train_step,
)
from draftguide.training.trainer import (
    LogWindow,
    StopOnSignal,
    TimeBudget,
    TrainState,
    epoch_order,
    lr_factor,
    lr_schedule,
    planned_total,
    rank_batch,
    replan_due,
    restore_checkpoint,
    save_checkpoint,
)


# -- LR schedule ----------------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero_at_total():
    total, ratio = 100, 0.1  # 10 warmup steps
    assert [lr_factor(s, total, ratio) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, total, ratio) == 1.0  # cosine starts at its peak
    assert lr_factor(55, total, ratio) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(100, total, ratio) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, total, ratio) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    decay = [lr_factor(s, total, ratio) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_factor(0, 5, 0.0) == 1.0  # at least one warmup step


def test_lr_schedule_follows_a_replanned_total():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    state = TrainState(total=1000)
    sched = lr_schedule(opt, state, warmup_ratio=0.01)
    for _ in range(20):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(2.0 * lr_factor(20, 1000, 0.01))
    state.total = 40  # a time budget re-plans: the rest of the schedule ends at 40
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(2.0 * lr_factor(21, 40, 0.01))
    assert lr_factor(21, 40, 0.01) < 0.5 < lr_factor(21, 1000, 0.01)
    assert sched.state_dict()["lr_lambdas"] == [None]  # the schedule's function is not saved in checkpoints


# -- time budget ----------------------------------------------------------------------------------
def test_planned_total_fits_the_time_left_and_never_exceeds_the_nominal_total():
    # 100 s left at 0.5 s/step: 97% of 200 steps more
    assert planned_total(total=10_000, step=20, per_step_s=0.5, left_s=100.0) == 20 + 194
    assert planned_total(total=100, step=20, per_step_s=0.5, left_s=100.0) == 100
    assert planned_total(total=100, step=20, per_step_s=0.5, left_s=-5.0) == 20  # over budget: stop now


def test_replan_is_due_at_the_11th_step_then_every_50():
    assert [s for s in range(1, 200) if replan_due(s)] == [11, 61, 111, 161]


def test_time_budget_replans_from_this_runs_step_time():
    state = TrainState(total=10_000, elapsed_s=20.0)  # 20 s spent by an earlier run of this training
    budget = TimeBudget(budget_s=120.0, nominal_total=10_000, t_start=0.0)
    now, replans = 0.0, []
    for _ in range(11):
        now += 5.0 if budget.steps_here == 0 else 0.5  # the first step pays one-off costs: not timed
        state.step += 1
        replans.append(budget.step_done(state, now))
    assert replans == [False] * 10 + [True] and state.planned
    # at t=10: 0.5 s/step, 120 - 20 - 10 = 90 s left -> 11 + int(0.97 * 180)
    assert state.total == 11 + 174
    state.step += 1
    assert not budget.step_done(state, now + 0.5) and state.total == 185  # no re-plan until the 61st step


# -- data order -----------------------------------------------------------------------------------
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = epoch_order(50, 3, 0)
    assert sorted(a) == list(range(50)) and a != tuple(range(50))
    epoch_order.cache_clear()
    assert epoch_order(50, 3, 0) == a  # recomputed, not cached: a function of (n, seed, epoch) alone
    assert epoch_order(50, 3, 1) != a and epoch_order(50, 4, 0) != a


def test_rank_shards_are_disjoint_and_cover_the_batch():
    n, bs = 10, 4
    whole = rank_batch(TrainState(), n, bs, seed=0)
    shards = [rank_batch(TrainState(), n, bs, seed=0, rank=r, world=2) for r in (0, 1)]
    assert len(whole) == bs and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(whole)


def _walk(state: TrainState, steps: int, n: int = 10, bs: int = 4) -> list[list[int]]:
    out = []
    for _ in range(steps):
        out.append(rank_batch(state, n, bs, seed=7))
        state.pos += bs
    return out


def test_data_order_rolls_over_epochs_and_is_identical_after_a_resume():
    state = TrainState()
    straight = _walk(state, 7)
    assert (state.epoch, state.pos) == (3, 4)  # 2 full batches of 4 per epoch of 10; the last 2 samples wait
    assert straight[0] + straight[1] == list(epoch_order(10, 7, 0)[:8])
    assert straight[2] == list(epoch_order(10, 7, 1)[:4])
    first = TrainState()
    head = _walk(first, 3)
    resumed = TrainState()
    resumed.load_dict(first.to_dict())  # what a checkpoint carries
    assert head + _walk(resumed, 4) == straight


# -- state ----------------------------------------------------------------------------------------
def test_state_round_trips_and_loads_an_older_checkpoints_dict():
    s = TrainState(step=5, epoch=1, pos=8, seed=3, scale_fitted=True, elapsed_s=2.5, total=9, planned=True)
    t = TrainState()
    t.load_dict(s.to_dict())
    assert t == s
    old = {"step": 4, "epoch": 0, "pos": 8, "seed": 0, "scale_fitted": True, "elapsed_s": 1.0, "total": 6}
    u = TrainState(total=99)
    u.load_dict(old)  # written before `planned` and `labels_seen` existed
    assert (u.step, u.total, u.planned, u.labels_seen) == (4, 6, False, 0)


def test_log_window_means_and_rate():
    w = LogWindow(2, t0=10.0)
    w.add(2.0, torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([3, 2]))
    w.add(4.0, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]), torch.tensor([4, 1]))
    state = TrainState(step=2, epoch=0, elapsed_s=100.0, labels_seen=20)
    row = w.row(state, lr=1e-3, grad_norm=0.7, world=2, now=12.0, t_start=9.0)
    assert row["loss"] == 3.0 and row["acc"] == [0.75, 0.25] and row["agree"] == [0.5, 0.5]
    assert row["labels_per_s"] == 10 * 2 / 2.0 and row["elapsed_s"] == 103.0
    assert list(row) == [
        "step",
        "epoch",
        "loss",
        "acc",
        "agree",
        "labels_seen",
        "lr",
        "grad_norm",
        "labels_per_s",
        "elapsed_s",
    ]


def test_stop_on_signal_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the process lives on to save
    assert signal.getsignal(signal.SIGTERM) is before
    with StopOnSignal(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before  # ranks > 0 under torchrun keep the default


# -- build, step, checkpoint, export on a tiny target ---------------------------------------------
def _samples(n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(4, 90, (int(torch.randint(18, 30, (1,), generator=g)),), generator=g).tolist(),
            "prompt_len": 5,
        }
        for _ in range(n)
    ]


def _cfg(**kw) -> TrainConfig:
    base = dict(
        block_size=4,
        draft_layers=1,
        target_layer_ids=[1, 3],
        anchors_per_seq=6,
        batch_size=2,
        lr=3e-3,
        warmup_ratio=0.0,
        vocab_subset=None,
        mask_token_id=3,
    )
    return TrainConfig(**(base | kw))


def _run(cfg: TrainConfig, samples: list[dict], total: int = 20):
    target = tiny_target()
    state = TrainState(seed=cfg.seed, total=total)
    return target, state, build_run(target, char_tokenizer(), samples, cfg, state)


def test_nominal_total_from_steps_or_epochs():
    assert nominal_total(_cfg(steps=7), 100) == 7
    assert nominal_total(_cfg(epochs=2.5), 10) == 12  # 5 batches of 2 per epoch
    assert nominal_total(_cfg(epochs=1.0, batch_size=8), 3) == 1


def test_subset_head_rows_and_label_map():
    target = tiny_target()
    head, remap = subset_head(target, torch.tensor([5, 9, 40]), torch.device("cpu"))
    assert torch.equal(head, target.lm_head.weight[[5, 9, 40]])
    assert remap[[5, 9, 40]].tolist() == [0, 1, 2] and (remap == IGNORE).sum() == remap.numel() - 3
    full, none = subset_head(target, None, torch.device("cpu"))
    assert full is target.lm_head.weight and none is None


def test_one_step_lowers_the_loss_on_a_fixed_batch_and_fits_the_scale_once():
    cfg = _cfg()
    batch = _samples(2)
    target, state, run = _run(cfg, batch)
    assert torch.equal(run.scale.scale, torch.ones_like(run.scale.scale)) and not state.scale_fitted
    losses = [float(train_step(run, target, batch, cfg, state, rng=random.Random(0)).loss) for _ in range(8)]
    assert state.scale_fitted and not torch.equal(run.scale.scale, torch.ones_like(run.scale.scale))
    fitted = run.scale.scale.clone()
    out = train_step(run, target, _samples(2, seed=1), cfg, state, rng=random.Random(0))
    assert torch.equal(run.scale.scale, fitted)  # fitted on the first batch only
    assert losses[-1] < 0.8 * losses[0], losses
    assert out.acc.shape == out.n.shape == (3,) and math.isfinite(float(out.grad_norm))
    assert run.sched.last_epoch == 9  # the schedule steps with the optimizer


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_state_and_rngs(tmp_path):
    cfg, samples = _cfg(), _samples()
    target, state, run = _run(cfg, samples)
    random.seed(1)
    for i in range(3):
        train_step(run, target, samples[2 * i : 2 * i + 2], cfg, state)
        state.step += 1
    state.labels_seen, state.elapsed_s = 123, 4.5
    save_checkpoint(tmp_path / "checkpoint.pt", **run.checkpointed(), state=state, cfg={"lr": cfg.lr})
    assert not (tmp_path / "checkpoint.tmp").exists()  # written aside, then renamed
    expect_py, expect_torch = random.random(), torch.rand(3)

    _, fresh_state, fresh = _run(cfg, samples)
    random.seed(99)
    restore_checkpoint(tmp_path / "checkpoint.pt", **fresh.checkpointed(), state=fresh_state, dev=torch.device("cpu"))
    assert fresh_state == state
    assert random.random() == expect_py and torch.equal(torch.rand(3), expect_torch)
    a, b = run.draft.state_dict(), fresh.draft.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(run.scale.scale, fresh.scale.scale)
    assert fresh.sched.state_dict() == run.sched.state_dict()
    oa, ob = run.opt.state_dict()["state"], fresh.opt.state_dict()["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])
    # the next step is the same on both
    for r, s in ((run, state), (fresh, fresh_state)):
        train_step(r, target, samples[:2], cfg, s, rng=random.Random(5))
    a, b = run.draft.state_dict(), fresh.draft.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_a_draft_that_load_draft_reads_with_the_scale_folded_in(tmp_path):
    cfg, samples = _cfg(), _samples()
    target, state, run = _run(cfg, samples)
    train_step(run, target, samples[:2], cfg, state)
    fc_before = run.draft.fc.weight.detach().clone()
    export_draft(run.draft, run.scale, tmp_path / "draft", torch.float32)
    assert torch.equal(run.draft.fc.weight, fc_before)  # the training draft keeps reading scaled features
    out = load_draft(tmp_path / "draft", target).eval()
    assert out.block_size == 4 and out.target_layer_ids == [1, 3] and out.mask_token_id == 3
    ids = torch.tensor([samples[0]["input_ids"]])
    with torch.no_grad():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, [1, 3])
        torch.testing.assert_close(out.fc(feats), run.draft.fc(run.scale(feats)), atol=1e-5, rtol=1e-4)
