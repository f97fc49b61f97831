"""The server's optimizer: what it does with each round's step, with state no client ever sees.

A round's combiner and server rule propose the next adapter θ' (DESIGN 2.1/2.2). The
server optimizer turns the proposed step d = θ' − θ into the step it takes:

- ``none``: θ' as proposed (FedAvg's server, the default);
- ``momentum`` (FedAvgM, Hsu et al. 2019, arXiv:1909.06335): m ← β·m + d, θ ← θ + m;
- ``adam`` / ``yogi`` (FedAdam / FedYogi, Reddi et al. 2021): ``fedopt.py``.

Each is registered in ``fedlpp.registry.SERVER_OPTIMIZERS`` with a factory that takes the
run's ``[algorithm]`` config.

Momentum is a model-privacy candidate (issue 11): the clients only ever receive Q(θ) and
train from it; m lives on the server and is kept in the checkpoint so that ``--resume``
continues the same run. A void round (the adapter unchanged: every update refused, a
SecAgg abort) takes no step, so m does not carry the adapter on without the clients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

from fedlpp import registry
from fedlpp.algorithms.round import MAX_ABS_VALUE, within_broadcast_range
from fedlpp.models.lora import Adapter

if TYPE_CHECKING:
    from fedlpp.config import AlgorithmConfig

log = logging.getLogger(__name__)


class ServerOptimizer(Protocol):
    """Turns the round's proposed adapter into the one the server keeps; its state goes into the checkpoint."""

    def step(self, adapter: Mapping[str, torch.Tensor], proposed: Adapter) -> Adapter: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the state a checkpoint holds (a ValueError names what does not fit)."""
        ...

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """The restored state must match the adapter it moves (a ValueError otherwise)."""
        ...


def is_void(adapter: Mapping[str, torch.Tensor], proposed: Mapping[str, torch.Tensor]) -> bool:
    """A void round (every update refused, a SecAgg abort): nothing was learned, so nothing moves."""
    return all(torch.equal(proposed[n], adapter[n]) for n in adapter)


def check_state_shapes(what: str, state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, v in state.items():
        if name not in shapes or tuple(v.shape) != tuple(shapes[name]):
            raise ValueError(f"the checkpoint's server {what} for {name!r} does not match the adapter")


class NoServerOptimizer:
    """The proposed adapter, as it is."""

    def step(self, adapter: Mapping[str, torch.Tensor], proposed: Adapter) -> Adapter:
        return proposed

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the checkpoint holds server optimizer state ({sorted(state)[0]}, ...) but the run has none")

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        pass


class ServerMomentum:
    """FedAvgM: heavy-ball momentum on the server's proposed step."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {beta}")
        self.beta = beta
        self.velocity: dict[str, torch.Tensor] = {}

    def step(self, adapter: Mapping[str, torch.Tensor], proposed: Adapter) -> Adapter:
        if is_void(adapter, proposed):
            return proposed
        velocity, moved = dict(self.velocity), {}
        for name, value in adapter.items():
            if torch.equal(proposed[name], value):
                moved[name] = value  # frozen this round (RoLoRA's other factor): it and its velocity stay put
                continue
            step = proposed[name] - value
            if name in self.velocity:
                step = self.beta * self.velocity[name] + step
            velocity[name] = step
            moved[name] = value + step
        if not within_broadcast_range(moved):
            log.warning(
                "server momentum would take the adapter beyond %g (or to NaN); this round takes the proposed "
                "step without momentum and the velocity is kept",
                MAX_ABS_VALUE,
            )
            return proposed
        self.velocity = velocity
        return moved

    def state(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{n}": v for n, v in self.velocity.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith("velocity.")]
        if unknown:
            raise ValueError(f"server momentum cannot restore {unknown[0]!r} from the checkpoint")
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items()}

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """The restored velocity must match the adapter it moves (names and shapes)."""
        check_state_shapes("velocity", self.velocity, shapes)


def plain(cfg: AlgorithmConfig) -> NoServerOptimizer:
    return NoServerOptimizer()


def momentum(cfg: AlgorithmConfig) -> ServerMomentum:
    return ServerMomentum(cfg.server_momentum)


def make_server_optimizer(cfg: AlgorithmConfig) -> ServerOptimizer:
    """The registered server optimizer ``cfg.server_optimizer``, built from the run's algorithm config."""
    return registry.SERVER_OPTIMIZERS.get(cfg.server_optimizer).load()(cfg)
