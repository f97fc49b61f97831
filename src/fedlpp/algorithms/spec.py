"""The algorithms as data: what is broadcast, what is trained, how the server moves.

FedAvg+LoRA, FedLPP, FFA-LoRA and FedLPP+FFA-LoRA differ in exactly three choices
(DESIGN 2): whether the broadcast is quantized, whether A is frozen and derived from a
seed, and the server's update rule. One frozen spec holds them; the round functions in
``round.py`` read it. A small registry maps config names to specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlpp.quant import QuantSpec

SERVER_RULES = ("mean", "delta")


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    quant: QuantSpec | None  # broadcast quantizer (FedLPP); None = full precision
    freeze_a: bool  # FFA-LoRA: A from a seed, frozen; only B (and a classifier head) trained and sent
    server_rule: str = "mean"  # "mean": theta += lr*(Q(theta)+mean_delta-theta); "delta": theta += lr*mean_delta
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.server_rule not in SERVER_RULES:
            raise ValueError(f"server_rule {self.server_rule!r}: valid choices are {', '.join(SERVER_RULES)}")
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")


SpecFactory = Callable[[QuantSpec, str, float], AlgorithmSpec]
_REGISTRY: dict[str, SpecFactory] = {}


def register_algorithm(name: str, factory: SpecFactory) -> None:
    if name in _REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered")
    _REGISTRY[name] = factory


def get_algorithm(name: str, quant: QuantSpec, server_rule: str = "mean", server_lr: float = 1.0) -> AlgorithmSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; valid names are {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](quant, server_rule, server_lr)


def algorithm_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


# Without quantization the proxy point equals theta, so both server rules coincide.
register_algorithm("fedavg_lora", lambda q, rule, lr: AlgorithmSpec("fedavg_lora", None, False, "delta", lr))
register_algorithm("ffa_lora", lambda q, rule, lr: AlgorithmSpec("ffa_lora", None, True, "delta", lr))
register_algorithm("fedlpp", lambda q, rule, lr: AlgorithmSpec("fedlpp", q, False, rule, lr))
register_algorithm("fedlpp_ffa", lambda q, rule, lr: AlgorithmSpec("fedlpp_ffa", q, True, rule, lr))
