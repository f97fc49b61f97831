"""FedAvg+LoRA (DESIGN 2.1): full-precision broadcast, example-weighted mean of deltas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedlpp.algorithms.layout import Layout, flatten
from fedlpp.models.lora import Adapter, copy_adapter

VALUES = "values"


def full_precision_payload(adapter: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of a full-precision message: all of ``layout`` as one float32 vector."""
    return {VALUES: flatten(adapter, layout)}


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k (w_k / sum w) * t_k (weights = example counts), accumulated in float64, returned as float32.

    The server averages whole update vectors with one call, not tensor by tensor. numpy
    with two preallocated buffers: torch's mixed float32/float64 add allocates per call,
    which made the plain round's time vary 2-3x from run to run (bench/secagg.py).
    """
    if not tensors:
        raise ValueError("weighted_mean needs at least one tensor")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    acc = np.zeros(tuple(tensors[0].shape), dtype=np.float64)
    scaled = np.empty_like(acc)
    for t, w in zip(tensors, weights, strict=True):
        np.multiply(_as_numpy(t), w / total, out=scaled, dtype=np.float64)
        np.add(acc, scaled, out=acc)
    return torch.from_numpy(acc.astype(np.float32)).to(tensors[0].device)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy view (float32 or float64 kept as they are; other dtypes converted to float32)."""
    t = t.detach().cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)).numpy()


def server_step(
    adapter: Mapping[str, torch.Tensor],
    proxy: Mapping[str, torch.Tensor],
    mean_delta: Mapping[str, torch.Tensor],
    rule: str,
    lr: float,
) -> Adapter:
    """theta_{t+1} from theta_t, the broadcast point and the clients' mean delta.

    "delta": theta + lr * mean_delta  (FedAvg; FedLPP's "accurate gradient estimation").
    "mean":  theta + lr * (proxy + mean_delta - theta), i.e. towards the clients' mean
             adapter (DESIGN 2.2). Where proxy == theta the two rules are the same.
    Tensors absent from ``mean_delta`` (a frozen A) are kept as they are.
    """
    new = copy_adapter(adapter)
    for name, d in mean_delta.items():
        if rule == "delta":
            new[name] = adapter[name] + lr * d
        elif rule == "mean":
            new[name] = adapter[name] + lr * (proxy[name] + d - adapter[name])
        else:
            raise ValueError(f"unknown server rule {rule!r}")
    return new
