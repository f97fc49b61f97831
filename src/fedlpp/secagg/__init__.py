"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) with SecAgg+'s sparse graph (Bell et al., CCS 2020).

The server learns only the sum of the clients' fixed-point-encoded vectors (DESIGN 3.3).
Every step is bytes in, bytes out: ``ClientSession`` for each client and round,
``ServerSession`` for the server; ``run_local_round`` drives both in one process.
"""

from fedlpp.secagg.client import ClientSession
from fedlpp.secagg.crypto import generate_signing_key, verify_key_bytes
from fedlpp.secagg.errors import SERVER_ID, SecAggAbort, SecAggError, SecAggRangeError
from fedlpp.secagg.fixedpoint import (
    append_weight,
    decode_sum,
    encode,
    field_elements,
    in_range,
    split_weight,
    weight_coordinate,
)
from fedlpp.secagg.graph import NeighbourGraph, build_graph, graph_degree
from fedlpp.secagg.local import Dropouts, InProcess, Parties, Traffic, registry_of, run_local_round
from fedlpp.secagg.params import SecAggParams, SecAggParamsError
from fedlpp.secagg.server import AggregateResult, ServerSession
from fedlpp.secagg.wire import HEADER_BYTES, MessageType

__all__ = [
    "HEADER_BYTES",
    "SERVER_ID",
    "AggregateResult",
    "ClientSession",
    "Dropouts",
    "InProcess",
    "MessageType",
    "NeighbourGraph",
    "Parties",
    "SecAggAbort",
    "SecAggError",
    "SecAggParams",
    "SecAggParamsError",
    "SecAggRangeError",
    "ServerSession",
    "Traffic",
    "append_weight",
    "build_graph",
    "decode_sum",
    "encode",
    "field_elements",
    "generate_signing_key",
    "graph_degree",
    "in_range",
    "registry_of",
    "run_local_round",
    "split_weight",
    "verify_key_bytes",
    "weight_coordinate",
]
