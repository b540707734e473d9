"""The LR schedule and the time budget's arithmetic (the driver refits the schedule with both)."""
import pytest
import torch

from ctrefine.training.driver import CosineSchedule, epochs_within


def test_cosine_schedule_shape():
    f = CosineSchedule(total_steps=100, warmup_steps=10, min_lr_ratio=0.05)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.05 + 0.95 * 0.5)
    assert f(100) == pytest.approx(0.05) and f(500) == pytest.approx(0.05)
    f.total_steps = 55  # refitted: the floor is now reached at step 55
    assert f(55) == pytest.approx(0.05)


def test_refitted_total_steps_travel_in_the_scheduler_state():
    """DeepSpeed checkpoints LambdaLR.state_dict(); a refitted schedule must come back from it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineSchedule(100, 0, 0.0))
    sched.lr_lambdas[0].total_steps = 40
    state = sched.state_dict()
    fresh = torch.optim.lr_scheduler.LambdaLR(opt, CosineSchedule(100, 0, 0.0))
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total_steps == 40


@pytest.mark.parametrize("budget, elapsed, epoch_s, done, planned, expected", [
    (100, 10, 20, 1, 40, 5),    # 90 s left: 4 more epochs of 20 s
    (100, 10, 20, 1, 3, 3),     # never more than planned
    (100, 120, 20, 2, 40, 2),   # over budget: end now, never fewer than done
    (100, 99.9, 0.0, 1, 7, 7),  # an instant epoch: up to planned
])
def test_epochs_within(budget, elapsed, epoch_s, done, planned, expected):
    assert epochs_within(budget, elapsed, epoch_s, done, planned) == expected
