"""What a node itself requires of the rounds it trains: privacy it will not go below, whatever the server asks.

The noise multiplier, the clip norm and whether secure aggregation is on come to a node in the
server's message (its config and sigma). A node that requires more says so in its node config
(``fedlpp deploy supernode --min-noise-multiplier 1.0 --max-clip-norm 1.0 --require-secagg
--max-epsilon 8``) and refuses a round that asks for less: the reason is in its own log and, as its
error reply, in the server's failure record for the round; the run goes on without it.

``--max-epsilon`` is the node's own accountant: under DP-SGD (the noise it adds itself) it charges
each round's steps at the round's sigma and its own sampling rate to a ledger kept in its state
for the run, at delta = min(the round's, 1e-5), and refuses the round that would take its epsilon
past the limit — whatever batch size, local steps or number of rounds the server's config asks for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedlpp.config import ExperimentConfig
from fedlpp.engine.setup import fewest_noise_shares
from fedlpp.engine.transport import MessageError
from fedlpp.privacy.accounting import Accounting, add_steps, epsilon
from fedlpp.privacy.dp_sgd import sampling_rate

MIN_NOISE, MAX_CLIP, REQUIRE_SECAGG = "min-noise-multiplier", "max-clip-norm", "require-secagg"  # node config keys
MAX_EPSILON = "max-epsilon"
LEDGER = "fedlpp.privacy.node_ledger"  # the node's own accountant, in its state
NODE_DELTA = 1e-5  # the node accounts at the round's delta or this, whichever is smaller (a larger delta is a weaker claim)


@dataclass(frozen=True)
class NodePolicy:
    min_noise: float = 0.0  # the least DP noise multiplier this node trains with (0: none required)
    max_clip: float = 0.0  # the largest clip norm it accepts (0: none required)
    require_secagg: bool = False  # it sends its update only into secure aggregation
    max_epsilon: float = 0.0  # the most epsilon its own accountant lets DP-SGD spend on its data in a run (0: no limit)

    @staticmethod
    def of(node_config: Mapping[str, object]) -> NodePolicy:
        return NodePolicy(
            _number(node_config, MIN_NOISE),
            _number(node_config, MAX_CLIP),
            _flag(node_config, REQUIRE_SECAGG),
            _number(node_config, MAX_EPSILON),
        )

    def spend(self, state: RecordDict, cfg: ExperimentConfig, sigma: float, num_examples: int) -> None:
        """Charge this round to the node's own ledger, or refuse it (MessageError) when it would pass max-epsilon."""
        if self.max_epsilon <= 0:
            return
        if cfg.privacy.mode != "dp_sgd":
            raise MessageError(
                f"this node enforces {MAX_EPSILON}={self.max_epsilon:g} on DP-SGD, the noise it adds itself; the round asks "
                f"for privacy.mode={cfg.privacy.mode}"
            )
        record = state.config_records.get(LEDGER)
        history = [tuple(step) for step in json.loads(str(record["history"]))] if record is not None else []
        accounting = Accounting("rdp", "poisson", min(cfg.privacy.delta, NODE_DELTA))
        after = add_steps(history, sigma, sampling_rate(cfg.train.batch_size, num_examples), cfg.fl.local_steps)
        spent, would = epsilon(history, accounting), epsilon(after, accounting)
        if would > self.max_epsilon:
            raise MessageError(
                f"this round would take this node's epsilon from {spent:.4g} to {would:.4g} (delta {accounting.delta:g}), "
                f"above its {MAX_EPSILON}={self.max_epsilon:g}"
            )
        state[LEDGER] = ConfigRecord({"history": json.dumps(after)})  # charged before training: a failed round counts

    def check(self, cfg: ExperimentConfig, sigma: float, participants: int | None = None) -> None:
        """Refuse (MessageError) a round that asks this node for less privacy than it requires; ``participants``: how
        many clients the round's SecAgg registry lists (client-level DP's noise shares only add up when enough do)."""
        if self.require_secagg and not cfg.secagg.enabled:
            raise MessageError(f"this node requires secure aggregation ({REQUIRE_SECAGG}) and the round has none")
        if self.min_noise > 0:
            mode = cfg.privacy.mode
            if not (mode == "dp_sgd" or (mode == "client_dp" and cfg.secagg.enabled)):
                raise MessageError(
                    f"this node requires DP noise it adds itself ({MIN_NOISE}={self.min_noise:g}): the round asks for "
                    f"privacy.mode={mode}"
                    + (" without secure aggregation (the server would add the noise)" if mode == "client_dp" else "")
                )
            if sigma < self.min_noise:
                raise MessageError(
                    f"the round asks for noise multiplier {sigma:g}, below this node's minimum {MIN_NOISE}={self.min_noise:g}"
                )
            expected = cfg.fl.clients_per_round
            if mode == "client_dp" and (participants is None or participants < expected):
                raise MessageError(
                    f"each noise share is sized for fl.clients_per_round={expected} clients but the round's registry lists "
                    f"{participants}: together they would add less noise than sigma={sigma:g} asks"
                )
            if mode == "client_dp":
                self._check_fewest_shares(cfg, sigma)
        if self.max_clip > 0 and (cfg.privacy.mode == "none" or cfg.privacy.clip_norm > self.max_clip):
            clip = "no clipping" if cfg.privacy.mode == "none" else f"clip norm {cfg.privacy.clip_norm:g}"
            raise MessageError(f"the round asks for {clip}, above this node's maximum {MAX_CLIP}={self.max_clip:g}")

    def _check_fewest_shares(self, cfg: ExperimentConfig, sigma: float) -> None:
        """The protocol may unmask a sum of fewer shares than the round's K (dropouts), and the server's top-up is
        not this node's noise: refuse a round whose fewest shares would carry less than this node's minimum."""
        k = cfg.fl.clients_per_round
        fewest = fewest_noise_shares(cfg)
        effective = sigma * math.sqrt(fewest / k)
        if effective < self.min_noise:
            raise MessageError(
                f"a sum of this round may hold as few as {fewest} of its {k} noise shares (the SecAgg threshold's floor, "
                f"or secagg.min_survivors): its noise multiplier would then be {effective:.4g}, below this node's "
                f"minimum {MIN_NOISE}={self.min_noise:g}; secagg.min_survivors=1 makes every share count"
            )


def _number(node_config: Mapping[str, object], key: str) -> float:
    value = node_config.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise MessageError(f"node config {key}: expected a non-negative number, got {value!r}")
    return float(value)


def _flag(node_config: Mapping[str, object], key: str) -> bool:
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise MessageError(f"node config {key}: expected true or false, got {value!r}")
    return value
