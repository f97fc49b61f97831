"""FedProx's proximal term (Li et al. 2020, arXiv:1812.06127): a client's local objective plus (mu/2)·||w − w_start||².

It keeps a client's local steps near the broadcast it started from, which tames client drift
on heterogeneous data. Here it is a penalty the trainer adds to each step's loss
(``train.proximal_mu``; 0 = off, plain FedAvg): ``anchor`` fixes w_start when the round's
training begins, ``__call__`` is the term over the trained adapter tensors. The server is
unchanged. DP-SGD refuses it (Opacus makes the gradient inside its own step; the config says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ProximalTerm:
    mu: float
    start: list[torch.Tensor] = field(default_factory=list)  # w_start of each trained tensor, in the trainer's order

    def anchor(self, params: Sequence[nn.Parameter]) -> None:
        """The round's starting point: the values the trained tensors hold before the first step."""
        self.start = [p.detach().clone() for p in params]

    def __call__(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        """(mu/2)·||w − w_start||² (a scalar with a gradient into ``params``)."""
        return 0.5 * self.mu * sum(((p - s) ** 2).sum() for p, s in zip(params, self.start, strict=True))  # type: ignore[return-value]
