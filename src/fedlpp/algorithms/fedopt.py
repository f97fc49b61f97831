"""FedAdam and FedYogi: adaptive server optimizers on the round's proposed step (Reddi et al. 2021, arXiv:2003.00295).

The round's proposed step d = θ' − θ (the clients' aggregate after the server rule) is the
pseudo-gradient of Reddi et al.'s Algorithm 2, with its initialisation m = 0, v = τ²:

    m ← β1·m + (1 − β1)·d
    v ← β2·v + (1 − β2)·d²                         (Adam)
    v ← v − (1 − β2)·d²·sign(v − d²)               (Yogi: v moves additively towards d²)
    θ ← θ + η·m / (√v + τ)

η = ``algorithm.server_opt_lr``, β1 = ``algorithm.server_momentum``, β2 = ``algorithm.server_beta2``,
τ = ``algorithm.server_tau``. No bias correction, as in the paper (Flower's FedAdam adds one).
As with momentum, the state lives on the server only and in the checkpoint; a void round
takes no step, and a tensor the round did not train (RoLoRA's other factor) keeps its state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fedlpp.algorithms.round import MAX_ABS_VALUE, within_broadcast_range
from fedlpp.algorithms.server_opt import check_state_shapes, is_void
from fedlpp.models.lora import Adapter

if TYPE_CHECKING:
    from fedlpp.config import AlgorithmConfig

log = logging.getLogger(__name__)

SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (v, d², β2) -> the next v
PARTS = ("m", "v")  # the state's two moments, saved as "m.<tensor>" and "v.<tensor>"


def adam_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    return beta2 * v + (1 - beta2) * d2


def yogi_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    return v - (1 - beta2) * d2 * torch.sign(v - d2)


@dataclass
class AdaptiveServer:
    """Adam-style moments on the server's step; ``second_moment`` makes it FedAdam or FedYogi."""

    lr: float  # η
    beta1: float
    beta2: float
    tau: float  # τ: the adaptivity floor
    second_moment: SecondMoment
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def step(self, adapter: Mapping[str, torch.Tensor], proposed: Adapter) -> Adapter:
        if is_void(adapter, proposed):
            return proposed
        m, v, moved = dict(self.m), dict(self.v), {}
        for name, value in adapter.items():
            if torch.equal(proposed[name], value):
                moved[name] = value  # not trained this round: it and its moments stay put
                continue
            d = proposed[name] - value
            m[name] = self.beta1 * self.m.get(name, torch.zeros_like(d)) + (1 - self.beta1) * d
            v[name] = self.second_moment(self.v.get(name, torch.full_like(d, self.tau**2)), d * d, self.beta2)
            moved[name] = value + self.lr * m[name] / (v[name].sqrt() + self.tau)
        if not within_broadcast_range(moved):
            log.warning(
                "the adaptive server step would take the adapter beyond %g (or to NaN); this round takes the proposed "
                "step and the moments are kept",
                MAX_ABS_VALUE,
            )
            return proposed
        self.m, self.v = m, v
        return moved

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"m.{n}": t for n, t in self.m.items()}, **{f"v.{n}": t for n, t in self.v.items()}}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = [k for k in state if "." not in k or k.partition(".")[0] not in PARTS]
        if unknown:
            raise ValueError(f"the adaptive server optimizer cannot restore {unknown[0]!r} from the checkpoint")
        self.m = {k.removeprefix("m."): t.clone() for k, t in state.items() if k.startswith("m.")}
        self.v = {k.removeprefix("v."): t.clone() for k, t in state.items() if k.startswith("v.")}
        if set(self.m) != set(self.v):
            raise ValueError("the checkpoint's server optimizer state has first and second moments of different tensors")

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        check_state_shapes("first moment", self.m, shapes)
        check_state_shapes("second moment", self.v, shapes)


def fedadam(cfg: AlgorithmConfig) -> AdaptiveServer:
    return AdaptiveServer(cfg.server_opt_lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau, adam_moment)


def fedyogi(cfg: AlgorithmConfig) -> AdaptiveServer:
    return AdaptiveServer(cfg.server_opt_lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau, yogi_moment)
