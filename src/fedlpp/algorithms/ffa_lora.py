"""FFA-LoRA (DESIGN 2.3): A frozen and derived from a seed; only B is trained and sent."""

from __future__ import annotations

from collections.abc import Mapping

from fedlpp.models.lora import is_lora_a


def trained_names(shapes: Mapping[str, tuple[int, ...]], freeze_a: bool) -> list[str]:
    """Adapter tensors that clients train and that travel on the wire.

    With ``freeze_a`` every lora_A is excluded: all parties rebuild it from the seed, and
    aggregating B alone is exact because mean(B_k) A = mean(B_k A).
    """
    return [n for n in sorted(shapes) if not (freeze_a and is_lora_a(n))]
