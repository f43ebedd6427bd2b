"""Channel factorisation table of TenVOO (spec tenvoo.md §2).

TenVOO splits a channel count C into three factors (f0, f1, f2) with f0·f1·f2 = C. The released method uses a
hand-made lookup table, not an algorithm; the factors change the adapter's parameter count through f0·f1 and g0·g1,
so the exact table is shipped here to reproduce the published counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from medgen.errors import BadInputError

#: channel count -> three factors, as released with the method (non-increasing, exact product)
TENVOO_FACTORS: dict[int, tuple[int, int, int]] = {
    1: (1, 1, 1),
    2: (2, 1, 1),
    4: (2, 2, 1),
    6: (3, 2, 1),
    8: (2, 2, 2),
    12: (4, 3, 1),
    16: (4, 2, 2),
    24: (4, 3, 2),
    32: (4, 4, 2),
    48: (8, 3, 2),
    64: (8, 4, 2),
    96: (8, 4, 3),
    128: (8, 8, 2),
    192: (8, 6, 4),
    256: (8, 8, 4),
    384: (8, 8, 6),
    512: (16, 8, 4),
    768: (16, 8, 6),
    1024: (16, 16, 4),
}


def factorize(channels: int, table: Mapping[int, Sequence[int]] | None = None) -> tuple[int, int, int]:
    """Three factors of ``channels`` from ``table`` (default :data:`TENVOO_FACTORS`).

    Args:
        channels: channel / feature count of the adapted layer (>= 1).
        table: optional extra entries ``{channels: (f0, f1, f2)}`` that extend or override the shipped table
            (keys may be strings, as after a JSON round trip).

    Raises:
        BadInputError: no entry for ``channels``, or an entry whose product is not ``channels``.
    """
    merged = dict(TENVOO_FACTORS)
    if table:
        merged.update({int(key): tuple(value) for key, value in table.items()})
    if channels not in merged:
        known = ", ".join(str(key) for key in sorted(merged))
        raise BadInputError(
            f"TenVOO has no channel factorisation for {channels} channels (known: {known}); "
            f"pass factor_table={{{channels}: [f0, f1, f2]}} with f0*f1*f2 == {channels}."
        )
    factors = merged[channels]
    if len(factors) != 3 or factors[0] * factors[1] * factors[2] != channels:
        raise BadInputError(
            f"TenVOO factorisation of {channels} channels must be three integers whose product is {channels}, "
            f"got {list(factors)}."
        )
    return (int(factors[0]), int(factors[1]), int(factors[2]))


def check_rank(rank: object) -> int:
    """A TenVOO rank: a whole number >= 1 (a string, float or boolean from a job's options is refused, not cast)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BadInputError(f"TenVOO rank must be a whole number >= 1; got {rank!r}.")
    return rank
