"""Shamir sharing over F_(2^521-1): any t shares rebuild the secret, fresh randomness per split."""

import itertools
import secrets

import pytest

from fedlpp.secagg import shamir


def test_any_t_shares_rebuild_the_secret() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [0, 4, 9, 11, 20])
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({h: shares[h] for h in subset}, 3) == secret


def test_fewer_than_t_shares_are_refused() -> None:
    shares = shamir.split(b"\x01" * 32, 3, [1, 2, 3])
    with pytest.raises(ValueError, match="2 shares, need 3"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    p = shamir.PRIME
    total = 0
    for xi, yi in points:
        num = den = 1
        for xj, _ in points:
            if xj != xi:
                num, den = num * (x - xj) % p, den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


@pytest.mark.parametrize("target", [b"\x00" * 32, b"\xff" * 32, bytes(range(32))])
def test_t_minus_one_shares_are_consistent_with_every_secret(target: bytes) -> None:
    # Two of three shares plus a suitably forged third rebuild ANY secret: t - 1 shares
    # pin down nothing about b_u or s_sk_u.
    shares = shamir.split(b"\x07" * 32, 3, [1, 2, 3])
    known = [(shamir.share_x(1), shares[1]), (shamir.share_x(2), shares[2])]
    forged = _lagrange_at([(0, int.from_bytes(target, "big")), *known], shamir.share_x(3))
    assert shamir.reconstruct({1: shares[1], 2: shares[2], 3: forged}, 3) == target


def test_a_corrupt_share_changes_the_result() -> None:
    shares = shamir.split(b"\x07" * 32, 3, [1, 2, 3])
    shares[3] = (shares[3] + 1) % shamir.PRIME
    assert shamir.reconstruct(shares, 3) != b"\x07" * 32


def test_coefficients_come_from_secrets_and_differ_per_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = secrets.randbelow

    def spy(n: int) -> int:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(secrets, "randbelow", spy)
    a = shamir.split(b"\x00" * 32, 4, [1, 2, 3, 4])
    b = shamir.split(b"\x00" * 32, 4, [1, 2, 3, 4])
    assert calls == [shamir.PRIME] * 6  # t - 1 coefficients per split
    assert a != b


def test_share_bytes_round_trip_and_reject_non_field_elements() -> None:
    assert shamir.share_from_bytes(shamir.share_to_bytes(shamir.PRIME - 1)) == shamir.PRIME - 1
    with pytest.raises(ValueError):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(66, "big"))
