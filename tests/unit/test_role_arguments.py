"""What a site hands the protocol roles' constructors, checked there with an error naming the
argument: never an AttributeError from inside, or a TypeError after the update was encrypted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from secagg.ckks import CkksClient, CkksRoundConfig
from secagg.errors import ConfigurationError
from secagg.hazmat.quantize import Quantizer
from secagg.masking import MaskingClient, RoundConfig
from secagg.roster import Roster
from tests.ckks_kit import CkksRound, announcement_for
from tests.roundkit import Round


def test_a_numpy_integer_site_id_is_taken_as_an_int_by_both_clients() -> None:
    """A site id read from an array (numpy.int64) is the same site: the CKKS upload signs and
    verifies (it failed with a TypeError after encrypting), the masking client advertises."""
    r = CkksRound(sites=4, vector_length=16)
    ckks = CkksClient(r.config, np.int64(2), r.identities[2], r.public, r.inputs[2])
    assert type(ckks.site_id) is int
    upload = ckks.start()
    assert upload.site_id == 2
    r.server.handle(upload)  # verifies its signature

    m = Round(sites=4, vector_length=8)
    masking = MaskingClient(m.config, np.int64(3), m.identities[3], m.inputs[3])
    assert type(masking.site_id) is int
    assert masking.start().site_id == 3


@pytest.mark.parametrize("site_id", [True, 2.0, "2", None])
def test_a_site_id_that_is_not_an_integer_is_refused_by_name(site_id: Any) -> None:
    r = CkksRound(sites=4, vector_length=16)
    with pytest.raises(TypeError, match="site_id must be an integer"):
        CkksClient(r.config, site_id, r.identities[2], r.public, r.inputs[2])
    m = Round(sites=4, vector_length=8)
    with pytest.raises(TypeError, match="site_id must be an integer"):
        MaskingClient(m.config, site_id, m.identities[2], m.inputs[2])


def test_the_wrong_kind_of_config_identity_or_context_is_refused_by_name() -> None:
    r = CkksRound(sites=4, vector_length=16)
    m = Round(sites=4, vector_length=8)
    with pytest.raises(TypeError, match="config must be a CkksRoundConfig, got RoundConfig"):
        CkksClient(m.config, 2, r.identities[2], r.public, r.inputs[2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a RoundConfig, got CkksRoundConfig"):
        MaskingClient(r.config, 2, m.identities[2], m.inputs[2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"identity must be a signing\.IdentityKey, got bytes"):
        CkksClient(r.config, 2, r.roster[2], r.public, r.inputs[2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="context must be the round's PublicContext"):
        CkksClient(r.config, 2, r.identities[2], None, r.inputs[2])  # type: ignore[arg-type]
    for workers in ("2", 2.5, True):
        with pytest.raises(TypeError, match="workers must be an int"):
            CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2],
                       workers=workers)  # type: ignore[arg-type]


def test_a_roster_site_id_beyond_64_bits_is_a_configuration_error() -> None:
    """Site ids are encoded in 8 bytes: 2**63 and beyond is refused by name (it was a bare
    OverflowError from int.to_bytes)."""
    key = bytes(32)
    with pytest.raises(ConfigurationError, match=r"integers in \[1, 2\*\*63\)"):
        Roster({2**63: key}, bytes(32))
    with pytest.raises(ConfigurationError, match=r"integers in \[1, 2\*\*63\)"):
        Roster({2**64: key}, bytes(32))
    Roster({2**63 - 1: key}, bytes(32))


def test_a_vector_length_beyond_what_a_round_can_mask_is_refused_by_both_configs() -> None:
    """A vector and its weight are at most 2**31 words (what the mask expander covers): a
    vector_length of 2**31 was accepted by the config and failed only when masking."""
    m = Round(sites=4, vector_length=8)
    with pytest.raises(ConfigurationError, match=r"vector_length must be in \[1, 2\*\*31 - 1\]"):
        dataclasses.replace(m.config, vector_length=2**31)
    dataclasses.replace(m.config, vector_length=2**31 - 1)
    roster, announcement = announcement_for(4)
    with pytest.raises(ConfigurationError, match=r"vector_length must be in \[1, 2\*\*31 - 1\]"):
        CkksRoundConfig("r", roster, announcement, (1,), 2**31)
    assert isinstance(m.config, RoundConfig)


def test_a_quantizer_given_numpy_integers_is_the_one_given_ints() -> None:
    """word_bits=numpy.int64(64) was taken, then 2**word_bits wrapped to 0 and the quantiser
    claimed it had no precision for the sites."""
    q = Quantizer(clip=1.0, max_weight=1.0, max_sites=np.int64(10), word_bits=np.int64(64))
    assert q == Quantizer(clip=1.0, max_weight=1.0, max_sites=10, word_bits=64)
    assert type(q.word_bits) is int and type(q.max_sites) is int


def test_a_ckks_clients_workers_and_input_fail_at_construction_not_mid_round() -> None:
    """workers=0 and an update of the wrong length failed only at start(), after the site
    had joined the round."""
    r = CkksRound(sites=4, vector_length=16)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2], workers=0)
    values, weight = r.inputs[2]
    with pytest.raises(ValueError, match=r"update must have shape \(16,\)"):
        CkksClient(r.config, 2, r.identities[2], r.public, (values[:-1], weight))


def test_a_quantiser_with_one_level_per_site_is_refused() -> None:
    """At more than 2**31 sites on 32-bit words each site had one level: every update
    encoded to 0 or 1."""
    assert Quantizer(clip=1.0, max_weight=1.0, max_sites=2**30).levels == 3
    for sites in (2**31, 2**32 - 1):
        with pytest.raises(ValueError, match="leaves no precision"):
            Quantizer(clip=1.0, max_weight=1.0, max_sites=sites)


def test_a_quantisers_bound_beyond_the_float_range_is_a_value_error() -> None:
    """An int clip of 10**400 raised OverflowError from float(), not the ValueError the
    other bad bounds raise."""
    for field in ("clip", "max_weight"):
        with pytest.raises(ValueError, match=f"{field} is beyond the float range"):
            Quantizer(**{"clip": 1.0, "max_weight": 1.0, field: 10**400}, max_sites=3)


@pytest.mark.parametrize("bad", [None, (), (np.zeros(8),), (np.zeros(8), 1.0, 2.0), "ab",
                                 np.zeros(2), {"update": 1, "weight": 2}])
def test_a_model_input_that_is_no_update_weight_pair_is_refused_by_name(bad: Any) -> None:
    """It was "check_update() argument after * must be an iterable, not NoneType" or "too many
    values to unpack (expected 2)", from the constructor or, for a provider, mid-round."""
    r = CkksRound(sites=4, vector_length=16)
    m = Round(sites=4, vector_length=8)
    words = "model input must be an (update, weight) pair"
    with pytest.raises(TypeError, match=re.escape(words)):
        CkksClient(r.config, 2, r.identities[2], r.public, bad)
    with pytest.raises(TypeError, match=re.escape(words)):
        MaskingClient(m.config, 2, m.identities[2], bad)
    ckks = CkksClient(r.config, 2, r.identities[2], r.public, lambda: bad)
    with pytest.raises(TypeError, match=re.escape(words)):
        ckks.start()
    m.clients[1] = MaskingClient(m.config, 1, m.identities[1], lambda: bad)
    m.advance()
    m.advance()
    with pytest.raises(TypeError, match=re.escape(words)):
        m.clients[1].handle(m.outgoing[1])


def test_a_model_input_given_as_a_list_pair_is_still_taken() -> None:
    """``[update, weight]`` unpacked as a pair before the input was checked to be one; the
    check refuses what is no pair, not a list that is one (given, or returned by a provider)."""
    r = CkksRound(sites=4, vector_length=16)
    r.inputs = {s: [u, w] for s, (u, w) in r.inputs.items()}  # type: ignore[misc]
    uploads, _ = r.run()
    assert len(uploads) == 4
    CkksClient(r.config, 2, r.identities[2], r.public, lambda: [np.zeros(16), 1.0]).start()
    m = Round(sites=4, vector_length=8)
    for s, (u, w) in m.inputs.items():
        given: Any = [u, w] if s % 2 else (lambda u=u, w=w: [u, w])
        m.clients[s] = MaskingClient(m.config, s, m.identities[s], given)
    m.advance()
    m.advance()
    m.advance()  # every site's masked input was taken
    assert set(m.replies) == set(m.config.sites)


def test_seeded_encryption_without_the_secret_key_is_refused_at_construction() -> None:
    """seeded=True with only the public context: a clear error naming the cause when the
    client is made, not an error from inside the encryptor at start()."""
    r = CkksRound(sites=4, vector_length=16)
    with pytest.raises(ValueError, match="seeded encryption needs the secret key"):
        CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2], seeded=True)
    assert not CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2]).seeded


def test_a_ckks_client_takes_each_step_once_and_in_its_stage() -> None:
    """start() once (a second call is a PreconditionError naming the stage, not an input
    error); a site that holds no key completes at its upload and handles no release; the
    key holder handles only a ReleaseRequest (else InvalidMessage), after its upload."""
    from secagg.ckks import CkksStage, ReleaseRequest
    from secagg.errors import InvalidMessage, PreconditionError

    r = CkksRound(sites=3, vector_length=16)
    holder = r.client(1)
    with pytest.raises(PreconditionError, match="not valid in stage UPLOAD"):
        holder.handle(ReleaseRequest(None, ()))  # type: ignore[arg-type]
    uploads = [holder.start()]
    with pytest.raises(PreconditionError, match="start is not valid in stage RELEASE"):
        holder.start()
    others = [r.client(s) for s in (2, 3)]
    uploads += [c.start() for c in others]
    assert [c.stage for c in others] == [CkksStage.COMPLETED] * 2
    with pytest.raises(PreconditionError, match="start is not valid in stage COMPLETED"):
        others[0].start()
    for u in uploads:
        r.server.handle(u)
    aggregate = r.server.close_stage()[1]
    with pytest.raises(PreconditionError, match="not valid in stage COMPLETED"):
        others[0].handle(ReleaseRequest(aggregate, uploads))
    with pytest.raises(InvalidMessage, match="release request"):
        holder.handle((aggregate, uploads))  # type: ignore[arg-type]
    assert holder.stage is CkksStage.RELEASE
    assert holder.handle(ReleaseRequest(aggregate, uploads)).sites == (1, 2, 3)
    assert holder.stage is CkksStage.COMPLETED  # type: ignore[comparison-overlap]
