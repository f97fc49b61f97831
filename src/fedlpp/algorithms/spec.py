"""The algorithms as data: what is broadcast, what is trained and sent, how the server moves.

FedAvg+LoRA, FedLPP, FFA-LoRA, FedLPP+FFA-LoRA and RoLoRA differ in four choices
(DESIGN 2): whether the broadcast is quantized, whether A is derived from a seed and never
sent, which LoRA factors clients train in each round (``factors.py``), and the server's
update rule. One frozen spec holds them; the round functions in ``round.py`` read it. The
algorithms themselves are declared, as these four choices, in ``fedlpp.registry.ALGORITHMS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlpp import registry
from fedlpp.algorithms import factors
from fedlpp.quant import QuantSpec
from fedlpp.quant.stochastic import UplinkSpec

SERVER_RULES = ("mean", "delta")


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    quant: QuantSpec | None  # broadcast quantizer (FedLPP); None = full precision
    a_from_seed: bool = False  # FFA-LoRA: every party rebuilds A from a seed, so A never travels
    trains: str = "both"  # LoRA factors clients train and send: "both", "b" (FFA-LoRA), "alternate" (RoLoRA)
    server_rule: str = "mean"  # "mean": theta += lr*(Q(theta)+mean_delta-theta); "delta": theta += lr*mean_delta
    server_lr: float = 1.0
    uplink: UplinkSpec | None = None  # clients' updates as b-bit stochastic rounding (uplink.*); None = float32

    def __post_init__(self) -> None:
        if self.trains not in factors.SCHEDULES:
            raise ValueError(f"unknown factor schedule {self.trains!r}: valid choices are {', '.join(factors.SCHEDULES)}")
        if self.a_from_seed and self.trains != "b":
            raise ValueError(f"a_from_seed needs trains='b' (A from a seed is never trained), got {self.trains!r}")
        if self.server_rule not in SERVER_RULES:
            raise ValueError(f"server_rule {self.server_rule!r}: valid choices are {', '.join(SERVER_RULES)}")
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def trained_names(self, shapes: Mapping[str, Sequence[int]], round_: int) -> list[str]:
        """The adapter tensors clients train and send in ``round_``, in wire order."""
        return factors.trained_names(shapes, self.trains, round_)

    def broadcast_names(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The adapter tensors the server sends every round, in wire order."""
        return factors.broadcast_names(shapes, self.a_from_seed)


def get_algorithm(
    name: str, quant: QuantSpec, server_rule: str = "mean", server_lr: float = 1.0, uplink: UplinkSpec | None = None
) -> AlgorithmSpec:
    """The spec of the registered algorithm ``name`` (``fedlpp.registry.ALGORITHMS``), with the run's choices."""
    if name not in registry.ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid names are {', '.join(sorted(registry.ALGORITHMS.names()))}")
    traits = registry.ALGORITHMS.get(name).traits
    return AlgorithmSpec(
        name,
        quant if traits.get("quantized_broadcast") else None,
        a_from_seed=bool(traits.get("a_from_seed", False)),
        trains=str(traits.get("trains", "both")),
        server_rule=traits.get("server_rule") or server_rule,  # fixed by the algorithm, or the config's
        server_lr=server_lr,
        uplink=uplink,
    )


def algorithm_names() -> tuple[str, ...]:
    return tuple(sorted(registry.ALGORITHMS.names()))
