"""SecAgg messages are plain bytes that Flower's wire format carries unchanged."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.serde import ProtoConfigRecord, config_record_from_proto, config_record_to_proto
from secagg_harness import make_round

from fedlpp.secagg import HEADER_BYTES


def via_flower(message: bytes) -> bytes:
    """Send ``message`` as a Flower 1.41 ConfigRecord value through its protobuf encoding and back."""
    wire_bytes = config_record_to_proto(ConfigRecord({"secagg": message})).SerializeToString()
    received = config_record_from_proto(ProtoConfigRecord.FromString(wire_bytes))["secagg"]
    assert isinstance(received, bytes)
    return received


def test_a_round_with_a_dropout_sums_exactly_through_flowers_wire_format() -> None:
    sent: list[int] = []

    def counted(message: bytes) -> bytes:
        sent.append(len(message))
        return via_flower(message)

    rnd = make_round(5, dim=1000)  # complete graph: degree 4, t = 3
    rnd.carry = counted
    views = rnd.mask(rnd.share(rnd.advertise()), skip=[3])  # 3 drops after sharing keys
    result = rnd.unmask(rnd.sign(views))
    assert result.survivors == (0, 1, 2, 4) and result.dropped == (3,)
    np.testing.assert_array_equal(result.encoded, rnd.expected([0, 1, 2, 4]))
    # Every message crossed the transport: 5 adverts up, 5 key lists down, 5 shares up, then
    # one message down and one up per survivor in each of the last three steps.
    assert len(sent) == 5 + 2 * 5 + (4 + 4) + 2 * 4 + 2 * 4
    assert HEADER_BYTES + 4 * 1000 in sent  # a masked input: 4 bytes per value, no re-encoding
