"""Bounds the core checks on values it is handed, each on its own (a mutation review found
each removable with no test failing): a tensor spec's dims, a mask expander's start, a
roster's version and federation name, and a key announcement's round budget, signed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from secagg.errors import ConfigurationError, InvalidMessage
from secagg.hazmat.prg import MaskExpander
from secagg.model import TensorSpec
from secagg.roster import GRAPH_SEED_BYTES, Roster


@pytest.mark.parametrize("shape", [(-1,), (-1, -1), (-5,), (3, -2), (-2, -3)])
def test_a_tensor_spec_with_a_negative_dim_is_impossible(shape: tuple[int, ...]) -> None:
    """(-1, -1) has a size of 1 and (-5,) of -5: a spec a lying aggregator could publish."""
    with pytest.raises(ConfigurationError, match="impossible shape"):
        TensorSpec("w", shape, "float32")
    assert TensorSpec("w", tuple(abs(d) for d in shape), "float32").size >= 1


def test_a_tensor_spec_of_more_dims_than_numpy_holds_is_impossible() -> None:
    """(wherever a spec comes from: a file, the store, the wire) no array has more than 64."""
    with pytest.raises(ConfigurationError, match="impossible shape"):
        TensorSpec("w", (1,) * 65, "float32")
    assert TensorSpec("w", (1,) * 64, "float32").size == 1


def test_a_mask_expander_starts_at_no_negative_word() -> None:
    with pytest.raises(ValueError, match="start_word"):
        MaskExpander(4, start_word=-1)
    assert MaskExpander(4, start_word=0) is not None


def test_a_roster_has_a_version_from_one_and_a_string_federation() -> None:
    sites = {1: b"\x01" * 32, 2: b"\x02" * 32}
    seed = b"\x00" * GRAPH_SEED_BYTES
    assert Roster(sites, seed, federation="h", version=1).version == 1
    with pytest.raises(ConfigurationError, match="version"):
        Roster(sites, seed, federation="h", version=0)
    with pytest.raises(ConfigurationError, match="federation must be a string"):
        Roster(sites, seed, federation=12345678, version=1)  # type: ignore[arg-type]


def test_a_key_announcement_for_no_round_is_refused_even_signed() -> None:
    """max_rounds below 1, signed by the holder (announce() refuses to make one): refused
    by verify itself, not only by a signature that does not hold."""
    from secagg.ckks import KeyHolder
    from secagg.masking import make_roster

    roster, identities = make_roster(3)
    announcement = KeyHolder.generate().announce(holder=1, identity=identities[1], epoch="e")
    announcement.verify(roster)
    for budget in (0, -1):
        unsigned = replace(announcement, max_rounds=budget, signature=b"")
        signed = replace(unsigned, signature=identities[1].sign(unsigned.signed_bytes()))
        with pytest.raises(InvalidMessage):
            signed.verify(roster)


@pytest.mark.parametrize("shape", [(2**41, 0), (0, 2**70), (2**64, 0, 3)])
def test_a_tensor_spec_with_a_huge_dim_beside_an_empty_one_is_impossible(
        shape: tuple[int, ...]) -> None:
    """Its size is 0, but no array has such a dim: a lying aggregator's spec of (2**70, 0)
    raised numpy's "maximum supported dimension" ValueError at the site rebuilding the
    tensors, not the spec's refusal."""
    with pytest.raises(ConfigurationError, match="impossible shape"):
        TensorSpec("w", shape, "float32")
    assert TensorSpec("w", (2**20, 0), "float32").size == 0
