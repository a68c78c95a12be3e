from __future__ import annotations

import numpy as np
import pytest

from secagg.hazmat.prg import MaskExpander, expand

SEED = bytes(range(32))


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("start", [0, 1, 3, 4, 37, 1000])
def test_any_range_regenerates_alone(bits: int, start: int) -> None:
    whole = expand(SEED, 2000, word_bits=bits)
    part = expand(SEED, 500, word_bits=bits, start_word=start)
    np.testing.assert_array_equal(part, whole[start : start + 500])


def test_masks_differ_per_seed_and_look_uniform() -> None:
    a = expand(SEED, 100_000)
    b = expand(bytes(32), 100_000)
    assert not np.array_equal(a, b)
    # each of the 32 bits is set about half the time
    bits = np.unpackbits(a.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.01)


def test_add_then_subtract_is_identity_and_wraps() -> None:
    target = np.arange(10, dtype=np.uint32)
    expander = MaskExpander(10)
    expander.add_to(target, SEED)
    assert not np.array_equal(target, np.arange(10))
    expander.subtract_from(target, SEED)
    np.testing.assert_array_equal(target, np.arange(10))
    assert expander.bytes_generated == 80


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(31), bytes(33)])
def test_refuses_short_or_long_seed(seed: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand(seed, 4)


def test_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="length"):
        MaskExpander(-1)
    with pytest.raises(ValueError, match="word_bits"):
        MaskExpander(4, word_bits=16)


def test_every_seed_byte_changes_the_mask() -> None:
    base = expand(SEED, 16)
    for i in range(32):
        seed = bytearray(SEED)
        seed[i] ^= 1
        assert not np.array_equal(expand(bytes(seed), 16), base), f"seed byte {i} is ignored"


@pytest.mark.parametrize("bits", [32, 64])
def test_mask_words_use_their_full_width(bits: int) -> None:
    words = expand(SEED, 4096, word_bits=bits)
    assert int(words.max()) >= 2 ** (bits - 1)  # the top bit is set in about half of them
    top_bits = np.right_shift(words, bits - 8).astype(np.uint8)
    assert len(np.unique(top_bits)) > 200


@pytest.mark.parametrize(("start", "length", "error"), [
    (0, 2**62, "at most 2\\*\\*31"), (0, 2**31 + 1, "at most 2\\*\\*31"),
    (2**130 - 3, 4, "128-bit block counter"), (0.0, 4, "integers"), (4.0, 0, "integers")])
def test_an_index_range_past_the_bound_is_refused_before_allocating(start: int, length: int,
                                                                     error: str) -> None:
    """Past the bound an expander would ask for exabytes (OverflowError or MemoryError from
    deep inside) or run its 128-bit counter round, repeating the keystream."""
    with pytest.raises(ValueError, match=error):
        MaskExpander(length, start_word=start)
    assert expand(b"\x01" * 32, 4, start_word=2**130 - 4).shape == (4,)  # the last 4 words


@pytest.mark.parametrize(("bits", "target"), [
    (64, np.zeros(4, np.uint32)),   # took the low halves of 64-bit words
    (32, np.zeros(4, np.uint64)),   # did not wrap at 2**32
    (32, np.zeros(4, np.int64)),
    (32, np.zeros(4, np.float64)),
    (32, np.zeros((2, 2), np.uint32)),  # took words broadcast across its rows
    (32, [0, 0, 0, 0]),
])
def test_apply_masks_refuses_a_target_that_is_not_flat_words(bits: int, target: object) -> None:
    from secagg.hazmat.prg import apply_masks

    with pytest.raises(TypeError, match="flat array of"):
        apply_masks(target, [(SEED, 1)], word_bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("sign", [0, -7, 5, float("nan"), 1.0, True, None])
def test_apply_masks_refuses_a_sign_other_than_plus_or_minus_one(sign: object) -> None:
    from secagg.hazmat.prg import apply_masks

    target = np.zeros(4, np.uint32)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        apply_masks(target, [(SEED, 1), (SEED, sign)])  # type: ignore[list-item]
    assert not target.any()  # checked before any mask is applied


@pytest.mark.parametrize("bits", [32, 64])
def test_apply_masks_adds_and_subtracts_exact_words(bits: int) -> None:
    from secagg.hazmat.prg import apply_masks, word_dtype

    target = np.zeros(100, word_dtype(bits))
    apply_masks(target, [(SEED, 1)], word_bits=bits)
    np.testing.assert_array_equal(target, expand(SEED, 100, word_bits=bits))
    apply_masks(target, [(SEED, -1)], word_bits=bits)
    assert not target.any()
