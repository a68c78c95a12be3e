from __future__ import annotations

import pytest

from secagg.ckks import CkksRoundConfig, Preset, get_preset
from secagg.ckks.presets import MAX_LOG_Q_128, PRESETS
from secagg.errors import ConfigurationError
from tests.ckks_kit import announcement_for


def test_default_preset_is_the_lean_add_only_one() -> None:
    p = get_preset("add-only-4096")
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (4096, (50, 50), 38)
    assert sum(p.coeff_mod_bit_sizes) <= MAX_LOG_Q_128[4096] == 109
    assert p.slots == 2048 and p.data_bits == 50


def test_every_shipped_preset_is_within_the_128_bit_table() -> None:
    assert MAX_LOG_Q_128 == {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
    for p in PRESETS.values():
        assert sum(p.coeff_mod_bit_sizes) <= MAX_LOG_Q_128[p.poly_modulus_degree]


@pytest.mark.parametrize(
    ("n", "bits", "scale", "match"),
    [
        (4096, (60, 50), 38, "below 128-bit security"),
        (8192, (60, 60, 60, 40), 40, "below 128-bit security"),
        (16384, (60,) * 7 + (60,), 40, "below 128-bit security"),
        (3000, (50, 50), 38, "poly_modulus_degree"),
        (4096, (50,), 38, "at least two primes"),
        (4096, (61, 40), 38, "entries must be in"),
        (4096, (50, 50), 49, "scale_bits"),
    ],
)
def test_unsafe_or_invalid_presets_are_refused(n: int, bits: tuple[int, ...], scale: int,
                                               match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Preset("custom", n, bits, scale)


def test_unknown_preset_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="add-only-4096"):
        get_preset("fast-and-loose")


def test_headroom_refuses_rounds_whose_sum_could_overflow() -> None:
    roster, announcement = announcement_for(100)
    with pytest.raises(ConfigurationError, match="headroom"):
        CkksRoundConfig("r", roster, announcement, (1,), 10, max_weight=50.0)
    # the same round fits a preset with more data bits
    roster, announcement = announcement_for(100, "nvflare-default")
    CkksRoundConfig("r", roster, announcement, (1,), 10, max_weight=50.0,
                    preset="nvflare-default")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"key_holders": ()}, "key_holders"), ({"key_holders": (99,)}, "key_holders"),
     ({"min_sites": 2}, "min_sites"), ({"min_sites": 2, "corrupt_fraction": 0.0}, "min_sites"),
     ({"vector_length": 0}, "vector_length"),
     ({"announcement": b"key id"}, "announcement"), ({"clip": 0.0}, "clip"),
     ({"clip": float("inf")}, "clip"), ({"max_weight": 1e-300}, "max_weight"),
     ({"epoch": "another"}, "epoch"), ({"preset": "add-only-8192"}, "preset")],
)
def test_round_config_refusals_name_the_parameter(kwargs: dict[str, object], match: str) -> None:
    roster, announcement = announcement_for(5)
    args: dict[str, object] = {"round_id": "r", "roster": roster, "announcement": announcement,
                               "key_holders": (1,), "vector_length": 4}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        CkksRoundConfig(**args)  # type: ignore[arg-type]


def test_round_whose_values_would_drown_in_the_release_noise_is_refused() -> None:
    """clip * max_weight below the flooding noise: every released average would be noise."""
    roster, announcement = announcement_for(5)
    CkksRoundConfig("r", roster, announcement, (1,), 10, clip=1e-3)
    with pytest.raises(ConfigurationError, match="noise"):
        CkksRoundConfig("r", roster, announcement, (1,), 10, clip=1e-5)
