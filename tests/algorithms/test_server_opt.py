"""The server optimizer: FedAvgM's recurrence, no step on a void round, state restored exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlpp.algorithms.server_opt import NoServerOptimizer, ServerMomentum, make_server_optimizer


def _adapter(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.full((3,), -value)}


def test_momentum_follows_the_heavy_ball_recurrence():
    opt = ServerMomentum(0.5)
    theta = _adapter(0.0)
    first = opt.step(theta, _adapter(1.0))  # d = 1: m = 1
    assert torch.equal(first["a"], torch.full((2, 3), 1.0))
    second = opt.step(first, _adapter(2.0))  # d = 1: m = 0.5 * 1 + 1 = 1.5
    assert torch.equal(second["a"], torch.full((2, 3), 2.5))
    assert torch.equal(second["b"], torch.full((3,), -2.5))


def test_zero_momentum_is_the_proposed_adapter():
    opt, plain = ServerMomentum(0.0), NoServerOptimizer()
    theta, proposed = _adapter(0.25), _adapter(0.75)
    for _ in range(3):
        moved = opt.step(theta, proposed)
        assert all(torch.equal(moved[n], plain.step(theta, proposed)[n]) for n in theta)
        theta, proposed = moved, {n: t + 0.5 for n, t in moved.items()}


def test_a_void_round_takes_no_step():
    opt = ServerMomentum(0.9)
    theta = opt.step(_adapter(0.0), _adapter(1.0))
    assert opt.step(theta, dict(theta)) is not None
    assert all(torch.equal(opt.step(theta, dict(theta))[n], theta[n]) for n in theta)
    assert torch.equal(opt.velocity["a"], torch.full((2, 3), 1.0))  # the velocity waits for the next real round


def test_a_tensor_the_round_left_frozen_keeps_its_value_and_its_velocity():
    """RoLoRA freezes one factor a round: momentum must not move it, or B·mean(A_k) stops being exact."""
    opt = ServerMomentum(0.5)
    theta = opt.step(_adapter(0.0), _adapter(1.0))  # both move: m = 1 each
    b_round = opt.step(theta, {"a": theta["a"], "b": theta["b"] - 1.0})  # only b trained
    assert torch.equal(b_round["a"], theta["a"])  # a frozen: not moved by its old velocity
    assert torch.equal(opt.velocity["a"], torch.full((2, 3), 1.0))  # kept for a's next round
    assert torch.equal(b_round["b"], theta["b"] + 0.5 * -1.0 - 1.0)  # b: beta * m + d
    a_round = opt.step(b_round, {"a": b_round["a"] + 1.0, "b": b_round["b"]})
    assert torch.equal(a_round["a"], b_round["a"] + 0.5 * 1.0 + 1.0)
    assert torch.equal(a_round["b"], b_round["b"])


def test_state_round_trips_and_is_refused_where_it_does_not_belong():
    opt = ServerMomentum(0.9)
    opt.step(_adapter(0.0), _adapter(1.0))
    again = ServerMomentum(0.9)
    again.load(opt.state())
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            opt.step(_adapter(1.0), _adapter(3.0)).values(), again.step(_adapter(1.0), _adapter(3.0)).values(), strict=True
        )
    )
    with pytest.raises(ValueError, match="has none"):
        NoServerOptimizer().load(opt.state())
    with pytest.raises(ValueError, match="momentum"):
        make_server_optimizer(SimpleNamespace(server_optimizer="momentum", server_momentum=1.0))
    with pytest.raises(ValueError, match="valid choices"):
        make_server_optimizer(SimpleNamespace(server_optimizer="nope", server_momentum=0.9))


def test_momentum_that_would_leave_the_broadcast_range_is_not_taken():
    opt = ServerMomentum(0.9)
    theta = opt.step(_adapter(0.0), _adapter(65000.0))  # m = 65000
    kept = dict(opt.velocity)
    proposed = {n: t + 1.0 for n, t in theta.items()}
    moved = opt.step(theta, proposed)  # 0.9 * 65000 + 1 beyond 65504: the plain step instead
    assert all(torch.equal(moved[n], proposed[n]) for n in moved)
    assert all(torch.equal(opt.velocity[n], kept[n]) for n in kept)
