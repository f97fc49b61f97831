"""Malformed, tampered, misrouted and malicious messages: each is rejected, naming the sender."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_harness import Round, flip, make_round

from fedlpp.secagg import (
    HEADER_BYTES,
    SERVER_ID,
    ClientSession,
    MessageType,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    SecAggRangeError,
    ServerSession,
    generate_signing_key,
    shamir,
    wire,
)
from fedlpp.secagg import client as client_module


def _server_message(kind: MessageType, recipient: int, body: bytes, round_: int = 1) -> bytes:
    return wire.pack(kind, round_, SERVER_ID, recipient, body)


def _body(message: bytes, kind: MessageType, recipient: int) -> wire.Reader:
    return wire.unpack(message, kind, 1, recipient, SERVER_ID)[1]


# ------------------------------------------------------------------ signatures and ciphertexts


def test_tampered_advertisement_signature_is_rejected_by_every_neighbour() -> None:
    # The server forwards signatures unchecked; the clients, who rely on them, name the signer.
    rnd = make_round(4)
    for c in range(4):
        advert = rnd.clients[c].advertise()
        rnd.server.receive_advertisement(flip(advert, -1) if c == 2 else advert, c)
    key_lists = rnd.server.finish_advertise()
    for c in (0, 1, 3):
        with pytest.raises(SecAggError, match="message from client 2 rejected: advertisement signature does not verify") as info:
            rnd.clients[c].share_keys(key_lists[c])
        assert info.value.sender == "client 2"


def test_advertisement_altered_by_the_server_is_rejected_by_the_client() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    keys = wire.decode_key_list(_body(key_lists[0], MessageType.KEY_LIST, 0))
    # The server swaps in its own masking key for client 1 (a man-in-the-middle attempt).
    forged = dataclasses.replace(keys.adverts[0], s_public=bytes(32))
    body = wire.encode_key_list(dataclasses.replace(keys, adverts=(forged, *keys.adverts[1:])))
    with pytest.raises(SecAggError, match="client 1 rejected: advertisement signature does not verify"):
        rnd.clients[0].share_keys(_server_message(MessageType.KEY_LIST, 0, body))


def test_tampered_share_ciphertext_is_rejected_naming_its_sender() -> None:
    rnd = make_round(4)
    routed = rnd.share(rnd.advertise())
    boxes = wire.decode_ciphertexts(_body(routed[1], MessageType.ROUTED_SHARES, 1))
    boxes[3] = flip(boxes[3], 30)
    message = _server_message(MessageType.ROUTED_SHARES, 1, wire.encode_ciphertexts(boxes))
    with pytest.raises(SecAggError, match="client 3 rejected: share ciphertext fails authentication"):
        rnd.clients[1].masked_input(message, rnd.inputs[1])


def test_share_box_replayed_to_another_recipient_fails() -> None:
    # Associated data binds (round, sender, recipient): 0's box for 2 does not open at 1.
    rnd = make_round(4)
    routed = rnd.share(rnd.advertise())
    to_1 = wire.decode_ciphertexts(_body(routed[1], MessageType.ROUTED_SHARES, 1))
    to_2 = wire.decode_ciphertexts(_body(routed[2], MessageType.ROUTED_SHARES, 2))
    to_1[0] = to_2[0]
    message = _server_message(MessageType.ROUTED_SHARES, 1, wire.encode_ciphertexts(to_1))
    with pytest.raises(SecAggError, match="client 0 rejected: share ciphertext"):
        rnd.clients[1].masked_input(message, rnd.inputs[1])


def _advertise_low_order_key(rnd: Round, client: int, key: str) -> None:
    """``client`` sends the server a validly signed advertisement whose ``key`` is the all-zero (low-order) point."""
    message = rnd.clients[client].advertise()
    honest = wire.decode_advertise(wire.unpack(message, MessageType.ADVERTISE, rnd.server.round, SERVER_ID)[1], client)
    bad = dataclasses.replace(honest, **{key: bytes(32)}, signature=b"")
    signed = dataclasses.replace(bad, signature=rnd.keys[client].sign(wire.advert_signed_bytes(bad, rnd.server.round)))
    forged = wire.pack(MessageType.ADVERTISE, rnd.server.round, client, SERVER_ID, wire.encode_advertise(signed))
    rnd.server.receive_advertisement(forged, client)


@pytest.mark.parametrize("key", ["c_public", "s_public"])
def test_low_order_public_key_is_rejected_by_every_neighbour(key: str) -> None:
    # A validly signed advertisement with an all-zero key would make a share box key or
    # every pairwise mask public; each neighbour refuses it in its key exchange.
    rnd = make_round(4)
    _advertise_low_order_key(rnd, 1, key)
    for c in (0, 2, 3):
        rnd.server.receive_advertisement(rnd.clients[c].advertise(), c)
    key_lists = rnd.server.finish_advertise()
    for c in (0, 2, 3):
        with pytest.raises(SecAggError, match="client 1 rejected: advertises an invalid"):
            rnd.clients[c].share_keys(key_lists[c])


# ------------------------------------------------------------------ framing


def test_truncated_masked_input_names_the_sender() -> None:
    rnd = make_round(4, dim=10)
    routed = rnd.share(rnd.advertise())
    message = rnd.clients[2].masked_input(routed[2], rnd.inputs[2])
    with pytest.raises(SecAggError, match="client 2 rejected: body length field says 40 bytes, message carries 39"):
        rnd.server.receive_masked_input(message[:-1], 2)


def test_truncated_header_names_the_transport_sender() -> None:
    rnd = make_round(4)
    with pytest.raises(SecAggError, match="client 3 rejected: truncated: 10 bytes"):
        rnd.server.receive_advertisement(rnd.clients[3].advertise()[:10], 3)


def test_truncated_body_with_consistent_length_field_names_the_field() -> None:
    rnd = make_round(4)
    message = rnd.clients[1].advertise()
    short = wire.pack(MessageType.ADVERTISE, 1, 1, SERVER_ID, message[HEADER_BYTES:-5])
    with pytest.raises(SecAggError, match="client 1 rejected: truncated signature"):
        rnd.server.receive_advertisement(short, 1)


def test_truncated_key_list_is_rejected_by_the_client_naming_the_server() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    body = key_lists[0][HEADER_BYTES:-7]
    with pytest.raises(SecAggError, match="server rejected: truncated"):
        rnd.clients[0].share_keys(_server_message(MessageType.KEY_LIST, 0, body))


def test_trailing_bytes_are_rejected() -> None:
    rnd = make_round(4)
    message = rnd.clients[0].advertise()
    padded = wire.pack(MessageType.ADVERTISE, 1, 0, SERVER_ID, message[HEADER_BYTES:] + b"\x00")
    with pytest.raises(SecAggError, match="client 0 rejected: 1 unexpected trailing bytes"):
        rnd.server.receive_advertisement(padded, 0)


def test_wrong_round_is_rejected() -> None:
    rnd = make_round(4)
    key = generate_signing_key()
    stale = ClientSession(1, key, {1: b""}, rnd.params, round_=0, dim=64).advertise()
    with pytest.raises(SecAggError, match="client 1 rejected: wrong round 0, expected 1"):
        rnd.server.receive_advertisement(stale, 1)


def test_wrong_message_type_is_rejected_by_server_and_client() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    advert_again = ClientSession(2, generate_signing_key(), {}, rnd.params, 1, 64).advertise()
    with pytest.raises(SecAggError, match="client 2 rejected: wrong message type ADVERTISE, expected SHARES"):
        rnd.server.receive_shares(advert_again, 2)
    rnd.clients[0].share_keys(key_lists[0])
    with pytest.raises(SecAggError, match="server rejected: wrong message type KEY_LIST, expected ROUTED_SHARES"):
        rnd.clients[0].masked_input(key_lists[0], rnd.inputs[0])


def test_bad_magic_version_and_spoofed_sender_are_rejected() -> None:
    rnd = make_round(4)
    message = rnd.clients[0].advertise()
    with pytest.raises(SecAggError, match="bad magic"):
        rnd.server.receive_advertisement(b"XXXX" + message[4:], 0)
    with pytest.raises(SecAggError, match=f"unsupported version {wire.VERSION + 1}"):
        rnd.server.receive_advertisement(message[:4] + bytes([wire.VERSION + 1]) + message[5:], 0)
    for old in (1, 2):  # before the signs changed; before the DCT-IV and 16-bit mask words
        with pytest.raises(SecAggError, match=f"unsupported version {old}, expected {wire.VERSION}"):
            rnd.server.receive_advertisement(message[:4] + bytes([old]) + message[5:], 0)
    with pytest.raises(SecAggError, match="client 3 rejected: header claims to come from client 0"):
        rnd.server.receive_advertisement(message, 3)


def test_message_for_another_client_is_rejected() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    with pytest.raises(SecAggError, match="server rejected: addressed to client 1, not to client 0"):
        rnd.clients[0].share_keys(key_lists[1])


def test_unknown_and_duplicate_senders_are_rejected() -> None:
    rnd = make_round(4)
    stranger = ClientSession(9, generate_signing_key(), {}, rnd.params, 1, 64)
    with pytest.raises(SecAggError, match="client 9 rejected: is not expected"):
        rnd.server.receive_advertisement(stranger.advertise(), 9)
    message = rnd.clients[0].advertise()
    rnd.server.receive_advertisement(message, 0)
    with pytest.raises(SecAggError, match="client 0 rejected: sent a second ADVERTISE"):
        rnd.server.receive_advertisement(message, 0)


def test_parameter_mismatch_is_detected_by_the_client() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    other = ClientSession(0, generate_signing_key(), {}, SecAggParams(scale=2.0**10), 1, 64)
    other.advertise()
    with pytest.raises(SecAggError, match="server rejected: protocol parameters differ"):
        other.share_keys(key_lists[0])


def test_shares_for_non_neighbours_are_rejected() -> None:
    rnd = make_round(4)
    key_lists = rnd.advertise()
    message = rnd.clients[1].share_keys(key_lists[1])
    boxes = wire.decode_ciphertexts(wire.unpack(message, MessageType.SHARES, 1, SERVER_ID)[1])
    del boxes[2]
    forged = wire.pack(MessageType.SHARES, 1, 1, SERVER_ID, wire.encode_ciphertexts(boxes))
    with pytest.raises(SecAggError, match=r"client 1 rejected: shares addressed to \[0, 3\]"):
        rnd.server.receive_shares(forged, 1)


# ------------------------------------------------------------------ a malicious server


def _up_to_survivors(n: int = 5) -> tuple[Round, dict[int, bytes]]:
    rnd = make_round(n)
    views = rnd.mask(rnd.share(rnd.advertise()))
    return rnd, views


def test_server_asking_for_both_shares_of_one_client_is_refused() -> None:
    rnd, _ = _up_to_survivors()
    both = wire.Survivors(survivors=(0, 1, 2, 3, 4), dropped=(3,))
    with pytest.raises(SecAggError, match=r"server rejected: lists client\(s\) \[3\] as both survived and dropped"):
        rnd.clients[0].sign_survivors(_server_message(MessageType.SURVIVORS, 0, wire.encode_survivors(both)))


def test_second_unmask_request_is_refused() -> None:
    rnd, views = _up_to_survivors()
    requests = rnd.sign(views)
    rnd.clients[0].unmask(requests[0])
    with pytest.raises(SecAggError, match="out-of-order request for unmask"):
        rnd.clients[0].unmask(requests[0])


def test_equivocating_server_is_caught_by_the_consistency_check() -> None:
    # The server tells client 0 that client 3 dropped (to get 0's share of s_sk_3) while
    # everyone else is told 3 survived (to get their shares of b_3): 3's input would be exposed.
    rnd, views = _up_to_survivors()
    lie = wire.Survivors(survivors=(0, 1, 2, 4), dropped=(3,))
    rnd.clients[0].sign_survivors(_server_message(MessageType.SURVIVORS, 0, wire.encode_survivors(lie)))
    honest = {c: rnd.clients[c].sign_survivors(views[c]) for c in (1, 2, 3, 4)}
    # Enough signatures for client 0's threshold (3), none from 3 (not a survivor in 0's view):
    # they sign the honest view, so the first one checked fails against 0's.
    signatures = {c: honest[c][HEADER_BYTES:] for c in (1, 2, 4)}
    request = _server_message(MessageType.UNMASK_REQUEST, 0, wire.encode_signatures(signatures))
    with pytest.raises(SecAggError, match="client 1 rejected: signature of the survivor list does not verify"):
        rnd.clients[0].unmask(request)


def test_client_refuses_its_own_signature_altered_by_the_server() -> None:
    rnd, views = _up_to_survivors()
    requests = rnd.sign(views)
    signatures = wire.decode_signatures(_body(requests[0], MessageType.UNMASK_REQUEST, 0))
    signatures[0] = signatures[1]
    request = _server_message(MessageType.UNMASK_REQUEST, 0, wire.encode_signatures(signatures))
    with pytest.raises(SecAggError, match="server rejected: forwards this client's own signature altered"):
        rnd.clients[0].unmask(request)


def test_too_few_forwarded_signatures_abort_on_the_client() -> None:
    rnd, views = _up_to_survivors()
    sig = rnd.clients[0].sign_survivors(views[0])[HEADER_BYTES:]
    request = _server_message(MessageType.UNMASK_REQUEST, 0, wire.encode_signatures({0: sig}))
    with pytest.raises(SecAggAbort, match="aborted at Unmasking: 1 clients that signed"):
        rnd.clients[0].unmask(request)


# ------------------------------------------------------------------ a misbehaving client


def test_forged_survivor_signature_is_rejected_by_every_other_survivor() -> None:
    rnd, views = _up_to_survivors()
    for c in range(5):
        signature = rnd.clients[c].sign_survivors(views[c])
        rnd.server.receive_signature(flip(signature, -1) if c == 2 else signature, c)
    requests = rnd.server.finish_consistency()
    for c in (0, 1, 3, 4):
        with pytest.raises(SecAggError, match="client 2 rejected: signature of the survivor list does not verify"):
            rnd.clients[c].unmask(requests[c])


def test_low_order_key_that_colluding_neighbours_accept_aborts_at_unmasking(monkeypatch: pytest.MonkeyPatch) -> None:
    # Honest neighbours refuse client 1's all-zero masking key; if all of them skipped that
    # check, the server still cannot use the key to remove a dropped client's masks: it aborts.
    real = client_module.exchange

    def tolerant(private: object, public: bytes) -> bytes:
        try:
            return real(private, public)  # type: ignore[arg-type]
        except ValueError:
            return bytes(32)

    monkeypatch.setattr(client_module, "exchange", tolerant)
    rnd = make_round(5)
    _advertise_low_order_key(rnd, 1, "s_public")
    for c in (0, 2, 3, 4):
        rnd.server.receive_advertisement(rnd.clients[c].advertise(), c)
    views = rnd.mask(rnd.share(rnd.server.finish_advertise()), skip=[3])
    with pytest.raises(SecAggAbort, match=r"client 1 advertised an invalid \(low-order\) masking key"):
        rnd.unmask(rnd.sign(views))


# ------------------------------------------------------------------ corrupt shares, ranges


def test_corrupt_revealed_share_aborts_instead_of_a_wrong_sum() -> None:
    rnd, views = _up_to_survivors()
    requests = rnd.sign(views)
    for c in (0, 1, 2, 3, 4):
        response = rnd.clients[c].unmask(requests[c])
        if c == 1:  # the first share (about client 0's b_0) is off by one
            response = flip(response, HEADER_BYTES + 4 + 4 + 1 + 65)
        rnd.server.receive_unmask(response, c)
    with pytest.raises(SecAggAbort, match="self-mask seed of client 0 does not match its commitment"):
        rnd.server.finish_unmask()


def test_unmask_response_with_the_wrong_share_kind_is_rejected() -> None:
    rnd, views = _up_to_survivors()
    requests = rnd.sign(views)
    reveals = wire.decode_reveals(wire.unpack(rnd.clients[2].unmask(requests[2]), MessageType.UNMASK_RESPONSE, 1, SERVER_ID)[1])
    wrong = [dataclasses.replace(reveals[0], kind=wire.ShareKind.MASKING_KEY), *reveals[1:]]
    forged = wire.pack(MessageType.UNMASK_RESPONSE, 1, 2, SERVER_ID, wire.encode_reveals(wrong))
    with pytest.raises(SecAggError, match="client 2 rejected: revealed shares do not match"):
        rnd.server.receive_unmask(forged, 2)


def test_revealed_share_outside_the_field_is_rejected_naming_its_sender() -> None:
    rnd, views = _up_to_survivors()
    requests = rnd.sign(views)
    reveals = wire.decode_reveals(wire.unpack(rnd.clients[2].unmask(requests[2]), MessageType.UNMASK_RESPONSE, 1, SERVER_ID)[1])
    outside = [dataclasses.replace(reveals[0], share=shamir.PRIME), *reveals[1:]]
    forged = wire.pack(MessageType.UNMASK_RESPONSE, 1, 2, SERVER_ID, wire.encode_reveals(outside))
    with pytest.raises(SecAggError, match="client 2 rejected: share about client 0 is not a field element"):
        rnd.server.receive_unmask(forged, 2)


def test_out_of_range_value_is_reported_to_that_client() -> None:
    rnd = make_round(4, dim=20)
    routed = rnd.share(rnd.advertise())
    values = rnd.inputs[2].copy()
    values[13] = -1.5
    with pytest.raises(SecAggRangeError, match=r"client 2 value at index 13 is -1.5") as info:
        rnd.clients[2].masked_input(routed[2], values)
    assert (info.value.client, info.value.index, info.value.value) == (2, 13, -1.5)
    # Nothing was sent; the client may bring its values into range and retry the step, and
    # the round still sums exactly (the failed attempt left the precomputed masks intact).
    rnd.inputs[2] = np.clip(values, -1, 1)
    retried = rnd.clients[2].masked_input(routed[2], rnd.inputs[2])
    assert len(retried) == HEADER_BYTES + 4 * 20
    rnd.server.receive_masked_input(retried, 2)
    for c in (0, 1, 3):
        rnd.server.receive_masked_input(rnd.clients[c].masked_input(routed[c], rnd.inputs[c]), c)
    result = rnd.unmask(rnd.sign(rnd.server.finish_masked_input()))
    assert np.array_equal(result.encoded, rnd.expected(range(4)))


@pytest.mark.parametrize("round_", [-1, 2**32])
def test_a_round_number_the_header_cannot_carry_is_refused_up_front(round_: int) -> None:
    key = generate_signing_key()
    with pytest.raises(ValueError, match=f"round {round_} must be in"):
        ClientSession(0, key, {0: b""}, SecAggParams(), round_, 8)
    with pytest.raises(ValueError, match=f"round {round_} must be in"):
        ServerSession(SecAggParams(), {}, round_, 8)
