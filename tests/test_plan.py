"""featcache.plan: head init by the nn.Linear rule, batch order, lr per epoch (vs torch's scheduler)."""

import math

import numpy as np
import pytest
import torch

from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.plan import check_config, cosine_lrs, make_plan, num_outputs_for


def test_num_outputs_one_logit_for_two_classes():
    assert num_outputs_for(2) == 1
    assert num_outputs_for(3) == 3
    assert num_outputs_for(10) == 10
    with pytest.raises(UserError):
        num_outputs_for(1)


def test_init_follows_nn_linear_rule():
    d, k = 256, 3
    plan = make_plan(n_train=10, feature_dim=d, num_outputs=k, config=TrainConfig())
    assert plan.weight.shape == (k, d) and plan.weight.dtype == np.float32
    assert plan.bias.shape == (k,) and plan.bias.dtype == np.float32
    bound = 1 / math.sqrt(d)
    assert np.abs(plan.weight).max() <= bound and np.abs(plan.bias).max() <= bound
    # uniform over the whole interval, like torch's draw (same bound, same distribution)
    ref = torch.nn.Linear(d, k).weight.detach().numpy()
    assert np.abs(ref).max() <= bound
    assert np.abs(plan.weight).max() > 0.95 * bound
    assert abs(plan.weight.std() - bound / math.sqrt(3)) < 0.05 * bound


def test_batches_cover_every_row_once_and_keep_the_short_last_batch():
    plan = make_plan(n_train=70, feature_dim=4, num_outputs=1, config=TrainConfig(epochs=3, batch_size=32))
    assert plan.perms.shape == (3, 70) and plan.perms.dtype == np.int64
    assert plan.num_batches == 3
    assert plan.batch_sizes().tolist() == [32, 32, 6]
    for e in range(3):
        batches = plan.batches(e)
        assert [len(b) for b in batches] == [32, 32, 6]
        assert sorted(np.concatenate(batches).tolist()) == list(range(70))
    assert not np.array_equal(plan.perms[0], plan.perms[1])  # reshuffled every epoch


def test_exact_multiple_has_no_empty_batch():
    plan = make_plan(n_train=64, feature_dim=4, num_outputs=1, config=TrainConfig(epochs=1, batch_size=32))
    assert plan.num_batches == 2 and [len(b) for b in plan.batches(0)] == [32, 32]


def test_same_seed_same_plan_other_seed_other_plan():
    args = dict(n_train=50, feature_dim=8, num_outputs=3)
    a = make_plan(**args, config=TrainConfig(seed=7))
    b = make_plan(**args, config=TrainConfig(seed=7))
    c = make_plan(**args, config=TrainConfig(seed=8))
    for name in ("weight", "bias", "perms", "lrs"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.weight, c.weight)
    assert not np.array_equal(a.perms, c.perms)


def test_init_and_early_order_do_not_depend_on_epoch_count():
    args = dict(n_train=50, feature_dim=8, num_outputs=1)
    short = make_plan(**args, config=TrainConfig(epochs=3))
    long = make_plan(**args, config=TrainConfig(epochs=10))
    assert np.array_equal(short.weight, long.weight)
    assert np.array_equal(short.perms, long.perms[:3])


def torch_cosine_lrs(base_lr: float, epochs: int) -> list[float]:
    """The lr of each epoch from torch's CosineAnnealingLR stepped once per epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 30, 100])
@pytest.mark.parametrize("base_lr", [1e-3, 0.1])
def test_cosine_lrs_match_torch_scheduler(epochs, base_lr):
    ours = make_plan(n_train=4, feature_dim=2, num_outputs=1,
                     config=TrainConfig(epochs=epochs, lr=base_lr, scheduler="cosine")).lrs
    ref = torch_cosine_lrs(base_lr, epochs)
    assert ours.shape == (epochs,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=0)
    assert ours[0] == base_lr


def test_cosine_closed_form_values():
    # 4 epochs: base * (1 + cos(pi e / 4)) / 2
    np.testing.assert_allclose(cosine_lrs(1.0, 4), [1.0, 0.8535533905932737, 0.5, 0.14644660940672624], rtol=1e-12)


def test_constant_schedule():
    lrs = make_plan(n_train=4, feature_dim=2, num_outputs=1, config=TrainConfig(epochs=5, lr=0.3, scheduler="none")).lrs
    assert lrs.tolist() == [0.3] * 5


@pytest.mark.parametrize("bad", [
    dict(optimizer="rmsprop"), dict(scheduler="step"), dict(epochs=0), dict(batch_size=0), dict(lr=0.0),
    dict(lr=float("nan")), dict(weight_decay=-1.0), dict(momentum=-0.1), dict(nesterov=True, momentum=0.0),
])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        check_config(TrainConfig(**bad))


def test_empty_train_split_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        make_plan(n_train=0, feature_dim=2, num_outputs=1, config=TrainConfig())
