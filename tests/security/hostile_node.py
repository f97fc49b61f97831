"""A modified node, run as its own process: ``python hostile_node.py <fedlpp arguments>``.

It is fedlpp's own ``fedlpp deploy supernode`` with the client side of secure aggregation
changed the way someone who controls a node can change it — the server sees only what
arrives in its messages:

- round 1: one value of its masked input is 100x the declared ``secagg.clip_range``, sent
  without the range check (encoded modulo 2^32 as the honest code would encode it);
- round 2: its input is honest but its weight coordinate claims 25 (the server's public
  weight bound under uniform weighting is 1);
- later rounds: honest.
"""

from __future__ import annotations

import sys

import numpy as np

from fedlpp.secagg import client

VALUE_FACTOR = 100.0  # round 1: x clip_range
FORGED_WEIGHT = 25  # round 2

honest_masked_input = client.ClientSession.masked_input


def encode_unchecked(values, params, client_id):  # to_field's signature, without the range check
    scaled = np.rint(np.asarray(values, dtype=np.float64).reshape(-1) * params.scale)
    return (scaled.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32).astype(params.word)


def masked_input(self, routed_shares, values):
    values = np.array(values, dtype=np.float64)
    if self.round == 1:
        values[0] = VALUE_FACTOR * self.params.clip_range
    elif self.round == 2:
        values[-1] = FORGED_WEIGHT / self.params.scale  # the weight coordinate encodes to the integer itself
    return honest_masked_input(self, routed_shares, values)


client.to_field = encode_unchecked
client.ClientSession.masked_input = masked_input

if __name__ == "__main__":
    from fedlpp.cli.main import main

    sys.exit(main(sys.argv[1:]))
