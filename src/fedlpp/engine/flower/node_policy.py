"""What a node itself requires of the rounds it trains: privacy it will not go below, whatever the server asks.

The noise multiplier, the clip norm and whether secure aggregation is on come to a node in the
server's message (its config and sigma). A node that requires more says so in its node config
(``fedlpp deploy supernode --min-noise-multiplier 1.0 --max-clip-norm 1.0 --require-secagg``) and
refuses a round that asks for less: the reason is in its own log and, as its error reply, in the
server's failure record for the round; the run goes on without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedlpp.config import ExperimentConfig
from fedlpp.engine.transport import MessageError

MIN_NOISE, MAX_CLIP, REQUIRE_SECAGG = "min-noise-multiplier", "max-clip-norm", "require-secagg"  # node config keys


@dataclass(frozen=True)
class NodePolicy:
    min_noise: float = 0.0  # the least DP noise multiplier this node trains with (0: none required)
    max_clip: float = 0.0  # the largest clip norm it accepts (0: none required)
    require_secagg: bool = False  # it sends its update only into secure aggregation

    @staticmethod
    def of(node_config: Mapping[str, object]) -> NodePolicy:
        return NodePolicy(_number(node_config, MIN_NOISE), _number(node_config, MAX_CLIP), _flag(node_config, REQUIRE_SECAGG))

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
        if self.max_clip > 0 and (cfg.privacy.mode == "none" or cfg.privacy.clip_norm > self.max_clip):
            clip = "no clipping" if cfg.privacy.mode == "none" else f"clip norm {cfg.privacy.clip_norm:g}"
            raise MessageError(f"the round asks for {clip}, above this node's maximum {MAX_CLIP}={self.max_clip:g}")


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
