"""FedAdam and FedYogi (Reddi et al. 2021): the recurrences by hand, no step on a void round, state restored exactly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedlpp.algorithms.fedopt import AdaptiveServer, adam_moment, yogi_moment
from fedlpp.algorithms.server_opt import make_server_optimizer

CFG = SimpleNamespace(server_opt_lr=0.1, server_momentum=0.9, server_beta2=0.99, server_tau=1e-3)


def _adapter(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.full((3,), -value)}


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_first_two_steps_follow_the_paper_by_hand(name):
    opt = make_server_optimizer(SimpleNamespace(server_optimizer=name, **vars(CFG)))
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    d = 0.5  # the proposed step of every coordinate of "a" (and -0.5 for "b")
    m1 = (1 - b1) * d
    v0 = tau**2
    v1 = b2 * v0 + (1 - b2) * d * d if name == "adam" else v0 - (1 - b2) * d * d * math.copysign(1, v0 - d * d)
    x1 = lr * m1 / (math.sqrt(v1) + tau)
    first = opt.step(_adapter(0.0), _adapter(d))
    assert torch.allclose(first["a"], torch.full((2, 3), x1), rtol=1e-5)
    assert torch.allclose(first["b"], torch.full((3,), -x1), rtol=1e-5)
    d2 = 0.25  # the next proposal moves each coordinate by 0.25 from where the server is
    second = opt.step(first, {n: t + (d2 if n == "a" else -d2) for n, t in first.items()})
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2 * d2 if name == "adam" else v1 - (1 - b2) * d2 * d2 * math.copysign(1, v1 - d2 * d2)
    assert torch.allclose(second["a"], torch.full((2, 3), x1 + lr * m2 / (math.sqrt(v2) + tau)), rtol=1e-5)


def test_yogi_moves_its_second_moment_additively_where_adam_decays_it():
    v, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(adam_moment(v, d2, 0.9), torch.tensor([0.9, 0.1]))
    assert torch.allclose(yogi_moment(v, d2, 0.9), torch.tensor([1.0, 0.1]))  # v > d^2: Yogi keeps v, Adam shrinks it


@pytest.mark.parametrize("second_moment", [adam_moment, yogi_moment])
def test_a_void_round_takes_no_step_and_a_frozen_tensor_keeps_its_state(second_moment):
    opt = AdaptiveServer(0.1, 0.9, 0.99, 1e-3, second_moment)
    theta = opt.step(_adapter(0.0), _adapter(1.0))
    state = {k: v.clone() for k, v in opt.state().items()}
    assert opt.step(theta, dict(theta)) == theta  # nothing learned: nothing moves
    assert all(torch.equal(state[k], v) for k, v in opt.state().items())
    proposed = {"a": theta["a"] + 1.0, "b": theta["b"]}  # only "a" trained this round (RoLoRA)
    moved = opt.step(theta, proposed)
    assert torch.equal(moved["b"], theta["b"])
    assert torch.equal(opt.state()["m.b"], state["m.b"]) and not torch.equal(opt.state()["m.a"], state["m.a"])


def test_state_round_trips_and_is_refused_where_it_does_not_belong():
    opt = AdaptiveServer(0.1, 0.9, 0.99, 1e-3, adam_moment)
    theta = opt.step(_adapter(0.0), _adapter(1.0))
    again = AdaptiveServer(0.1, 0.9, 0.99, 1e-3, adam_moment)
    again.load(opt.state())
    again.check({"a": (2, 3), "b": (3,)})
    following = _adapter(2.0)
    assert all(torch.equal(opt.step(theta, following)[n], again.step(theta, following)[n]) for n in theta)
    with pytest.raises(ValueError, match="cannot restore 'velocity.a'"):
        again.load({"velocity.a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="first moment for 'a' does not match"):
        again.check({"a": (3, 2), "b": (3,)})


def test_a_step_beyond_the_broadcast_range_is_not_taken():
    opt = AdaptiveServer(1e5, 0.0, 0.0, 1e-3, adam_moment)  # lr so large that one step would leave float16's range
    proposed = _adapter(1.0)
    assert all(torch.equal(opt.step(_adapter(0.0), proposed)[n], proposed[n]) for n in proposed)
    assert opt.state() == {}
