"""The single-device training engine: AdamW on fp32 masters of a bf16 module, exact resume, few operators."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctrefine.device import DevicePolicy
from ctrefine.errors import UserError
from ctrefine.training.engine import PlainEngine, checkpoint_engine, choose_engine


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.SiLU(),
                               torch.nn.Linear(8, 1))


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _engine(dtype, schedule=lambda s: 1.0 / (1 + s)):
    return PlainEngine(_model(), DevicePolicy(torch.device("cpu"), dtype), 1e-2, 1e-3, schedule, 0.5)


def _train(engine, batches):
    for x, y in batches:
        engine.backward(((engine(x.to(engine.policy.dtype)).float() - y) ** 2).mean())
        engine.step()


def test_bf16_step_is_adamw_on_fp32_masters():
    engine = _engine(torch.bfloat16)
    ref = _model()  # the same init, in fp32: AdamW fed the bf16 module's gradients, clipped the same way
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for x, y in _batches(3):
        engine.backward(((engine(x.bfloat16()).float() - y) ** 2).mean())
        for r, p in zip(ref.parameters(), engine.params):
            r.grad = p.grad.float().clone()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        opt.step()
        sched.step()
        engine.step()
        for r, m, p in zip(ref.parameters(), engine.masters, engine.params):
            assert m.dtype == torch.float32 and p.dtype == torch.bfloat16
            torch.testing.assert_close(m, r, atol=1e-6, rtol=1e-5)
            assert torch.equal(p, m.bfloat16()) and p.grad is None
            with torch.no_grad():
                r.copy_(m)  # the next step starts from the same weights (fused vs for-loop rounding apart)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_exactly(tmp_path, dtype):
    batches = _batches()
    whole = _engine(dtype)
    _train(whole, batches)
    first = _engine(dtype)
    _train(first, batches[:3])
    first.save_checkpoint(tmp_path, "epoch_0001", {"epoch": 0})
    second = _engine(dtype)
    path, client = second.load_checkpoint(tmp_path, "epoch_0001")
    assert client == {"epoch": 0} and checkpoint_engine(tmp_path / "epoch_0001") == "plain"
    _train(second, batches[3:])
    a, b = whole.state_dict(), second.state_dict()
    assert all(v.dtype == torch.float32 for v in b.values())  # the file holds the fp32 masters
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.scheduler.get_last_lr() == second.scheduler.get_last_lr()


class _Count(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layers", [3, 30])
def test_an_optimizer_step_dispatches_a_few_operators_whatever_the_parameter_count(layers):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])
    engine = PlainEngine(model, DevicePolicy(torch.device("cpu"), torch.bfloat16), 1e-3, 0.0, lambda s: 1.0, 1.0)
    for _ in range(2):  # the second step is counted (the first makes the moments)
        engine.backward(engine(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum())
        with _Count() as c:
            engine.step()
    assert c.n <= 20, c.n  # for-loop AdamW: ~8 per parameter tensor (480 for 30 layers)


def test_engine_choice():
    assert choose_engine("auto", 1) == "plain" and choose_engine("auto", 2) == "deepspeed"
    assert choose_engine("deepspeed", 1) == "deepspeed"
    with pytest.raises(UserError, match="training.engine=plain runs on one device"):
        choose_engine("plain", 2)
