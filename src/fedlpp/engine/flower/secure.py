"""A node's side of fedlpp's own SecAgg(+) protocol over Flower messages (Flower's SecAgg+ lives only on its legacy path).

A round under ``secagg.enabled``: the train message carries the broadcast plus the round's
registry of clients' verify keys; each client trains, turns its delta into the protocol's
input vector and answers with its signed key advertisement. The server then drives the
protocol's remaining four steps (``engine/aggregation.SecureAggregation``) as ``train.secagg``
messages (``FlowerTransport.ask``); a client that fails or stays silent at a step has dropped
out, and the server recovers its masks from the others' shares — or, below the threshold,
aborts loudly and keeps the adapter.

Each ClientApp call is a fresh process in a deployment, so a client keeps its session
(round keys, shares, its input vector) between messages in its node's own
``context.state``, which never leaves the node. Its long-term Ed25519 identity is made
there on the first query and announced to the server, which forwards everyone's keys:
signatures then protect against other clients, not against a server that swaps keys (the
PKI Bonawitz et al. assume is, here, the server — honest-but-curious, as Flower's SecAgg+).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from fedlpp.algorithms.secure import SecureEncoding
from fedlpp.config import ExperimentConfig
from fedlpp.engine.flower.messages import MessageError, require
from fedlpp.engine.secure import ACTION, registry_from_text, registry_text
from fedlpp.engine.setup import protocol_params, rotation
from fedlpp.secagg import (
    ClientSession,
    SecAggParams,
    generate_signing_key,
    verify_key_bytes,
)
from fedlpp.secagg.local import answer_step

log = logging.getLogger(__name__)

__all__ = ["ACTION", "SecureReplies", "next_step", "registry_from_text", "registry_text", "start_session", "verify_key"]

IDENTITY, SESSION = "fedlpp.secagg.identity", "fedlpp.secagg.session"  # records in a node's context.state
JOINED = "fedlpp.secagg.joined"  # the last round this node opened a session for


# --- the client's side ------------------------------------------------------------------------------


def verify_key(state: RecordDict) -> bytes:
    """This node's long-term verify key, made (from the OS CSPRNG) and kept in its state on first use."""
    return verify_key_bytes(_identity(state, create=True))


def _identity(state: RecordDict, create: bool = False) -> Ed25519PrivateKey:
    record = state.config_records.get(IDENTITY)
    if record is None:
        if not create:
            raise MessageError("this node has no SecAgg identity for the run (was it restarted after the run began?)")
        key = generate_signing_key()
        state[IDENTITY] = ConfigRecord({"private": key.private_bytes_raw()})
        return key
    return Ed25519PrivateKey.from_private_bytes(require(record, "private", bytes))


class SecureReplies:
    """A node's side of SecAgg over Flower: its verify key at the query, its advertisement after training."""

    def identify(self, state: RecordDict) -> dict[str, Any]:
        return {"verify_key": verify_key(state)}

    def encoding(self, cfg: ExperimentConfig, fields: Mapping[str, Any]) -> SecureEncoding:
        return encoding_of(cfg, fields)

    def reply(
        self, state: RecordDict, cfg: ExperimentConfig, fields: Mapping[str, Any], client_id: int, upload: Any
    ) -> dict[str, Any]:
        return start_session(state, cfg, encoding_of(cfg, fields), fields, client_id, upload)


def encoding_of(cfg: ExperimentConfig, fields: Mapping[str, Any]) -> SecureEncoding:
    """The protocol's parameters (from the config), the server's public weight bound n_max, and in a small field
    the rotation with the server's public seed."""
    params = protocol_params(cfg)
    if cfg.secagg.modulus_bits < 32:
        return SecureEncoding(params, require(fields, "weight_bound", int), rotation(cfg, require(fields, "rotation_seed", int)))
    return SecureEncoding(params, require(fields, "weight_bound", int))


def start_session(
    state: RecordDict,
    cfg: ExperimentConfig,
    encoding: SecureEncoding,
    fields: Mapping[str, Any],
    client_id: int,
    vector: np.ndarray | None,
) -> dict[str, Any]:
    """After training: a new session keeps the input vector; the reply is its advertisement (or out_of_range).

    ``fields["round"]`` has been checked against the broadcast's own round (ClientApp). A node
    opens one session per round, ever, in a run: two sums over different sets of clients for
    one round would reveal this input by subtraction.
    """
    round_ = require(fields, "round", int)
    joined = state.config_records.get(JOINED)
    if joined is not None and joined["round"] >= round_:
        raise MessageError(
            f"this node already took part in secure aggregation for round {joined['round']!r}; refusing round {round_}"
        )
    state[JOINED] = ConfigRecord({"round": round_})
    if vector is None:
        return {"out_of_range": True}
    registry_text = require(fields, "registry", str)
    session = ClientSession(client_id, _identity(state), registry_from_text(registry_text), encoding.params, round_, vector.size)
    advert = session.advertise()
    state[SESSION] = ConfigRecord(
        {
            "session": session.export_state(),
            "input": vector.tobytes(),
            "input_dtype": _input_dtype(vector).str,
            "round": round_,
            "registry": registry_text,
            "params": json.dumps(dataclasses.asdict(encoding.params)),
        }
    )
    return {"message": advert}


_INPUT_DTYPES = (np.dtype("<f8"), np.dtype("<u4"), np.dtype("<u2"))  # a fixed-point encoder's floats, or field elements


def _input_dtype(vector: np.ndarray) -> np.dtype:
    if vector.dtype not in _INPUT_DTYPES:
        raise TypeError(f"a SecAgg input is float64, or field elements as uint32 or uint16, not {vector.dtype}")
    return vector.dtype


def _stored_dtype(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in _INPUT_DTYPES:  # None first: numpy compares it equal to float64
        raise MessageError(f"this node's stored SecAgg input has dtype {name!r}, not one of {[d.str for d in _INPUT_DTYPES]}")
    return dtype


def next_step(state: RecordDict, fields: Mapping[str, Any]) -> bytes:
    """Restore this node's session, answer the step, keep the session for the next one (forget it after unmask)."""
    record = state.config_records.get(SESSION)
    step, round_ = require(fields, "step", str), require(fields, "round", int)
    if record is None or record["round"] != round_:
        raise MessageError(f"no SecAgg session for round {round_} on this node")
    params = SecAggParams(**json.loads(require(record, "params", str)))
    registry = registry_from_text(require(record, "registry", str))
    session = ClientSession.restore(require(record, "session", bytes), _identity(state), registry, params)
    values = np.frombuffer(require(record, "input", bytes), dtype=_stored_dtype(require(record, "input_dtype", str)))
    reply = answer_step(session, step, require(fields, "message", bytes), values)
    if step == "unmask":
        del state[SESSION]
    else:
        record["session"] = session.export_state()
        state[SESSION] = record
    return reply
