"""Which LoRA factors clients train and send, round by round (DESIGN 2.3; RoLoRA, arXiv 2502.01755).

Averaging LoRA factors is exact only when one of them is shared: mean_k(B_k) A = mean_k(B_k A)
when every client holds the same A, and B mean_k(A_k) = mean_k(B A_k) when they share B.
- ``both``: A and B are trained and sent (FedAvg+LoRA, FedLPP): the mean of products is
  approximated by the product of means.
- ``b``: FFA-LoRA. A is frozen at its seeded initial value; every party rebuilds it from the
  seed, so it never travels, and only B (and a classifier head) is trained and sent.
- ``alternate``: RoLoRA. One factor is frozen at its current global value (which the
  broadcast carries) while the other is trained and sent; they swap every round. Round 1
  trains B: at LoRA's initialisation B = 0, where A's gradient (B^T times the output's) is
  exactly zero, so a first round that trained A would be wasted. Odd rounds train B, even
  rounds A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlpp.models.lora import is_lora_a, is_lora_b

SCHEDULES = ("both", "b", "alternate")


def frozen_factor(schedule: str, round_: int) -> str | None:
    """The factor clients leave as they received it in ``round_``: "A", "B", or None."""
    if schedule == "both":
        return None
    if schedule == "b":
        return "A"
    if schedule == "alternate":
        return "A" if round_ % 2 == 1 else "B"
    raise ValueError(f"unknown factor schedule {schedule!r}: valid choices are {', '.join(SCHEDULES)}")


def _is_factor(name: str, factor: str | None) -> bool:
    return (factor == "A" and is_lora_a(name)) or (factor == "B" and is_lora_b(name))


def trained_names(shapes: Mapping[str, Sequence[int]], schedule: str, round_: int) -> list[str]:
    """Adapter tensors that clients train and send in ``round_``, in wire order.

    Everything but the frozen factor: a classifier head (not a LoRA factor, and averaged
    exactly) is trained every round.
    """
    frozen = frozen_factor(schedule, round_)
    return [n for n in sorted(shapes) if not _is_factor(n, frozen)]


def broadcast_names(shapes: Mapping[str, Sequence[int]], a_from_seed: bool) -> list[str]:
    """Adapter tensors the server sends: all of them, except A where every party rebuilds it from a seed."""
    return [n for n in sorted(shapes) if not (a_from_seed and is_lora_a(n))]
