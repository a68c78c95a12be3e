"""The proto is the single source of names: its enums and messages match the core's.

(That the committed modules in secagg/v1 are what protos/ compiles to is
tests/unit/test_generated_code.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg.errors import AbortReason
from secagg.masking import Stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def masking_pb2():  # type: ignore[no-untyped-def]
    from secagg.v1 import masking_pb2

    return masking_pb2


@pytest.fixture(scope="module")
def ckks_pb2():  # type: ignore[no-untyped-def]
    from secagg.v1 import ckks_pb2

    return ckks_pb2


def _proto_enum(pb2, name: str, prefix: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    enum = pb2.DESCRIPTOR.enum_types_by_name[name]
    return {v.name.removeprefix(prefix) if v.number else v.name: v.number for v in enum.values}


def test_stage_names_and_numbers_match(masking_pb2) -> None:  # type: ignore[no-untyped-def]
    assert _proto_enum(masking_pb2, "Stage", "STAGE_") == {s.name: s.value for s in Stage}


def test_abort_reasons_match(masking_pb2) -> None:  # type: ignore[no-untyped-def]
    assert _proto_enum(masking_pb2, "AbortReason", "ABORT_REASON_") == {
        r.name: r.value for r in AbortReason}


def test_message_fields_match_the_core(masking_pb2) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from secagg.masking import messages

    for name in ("AdvertiseKeys", "ShareKeys", "ConsistencySignature", "UnmaskResponse",
                 "KeyDirectory", "ShareDelivery", "SurvivorList", "UnmaskRequest",
                 "MaskAttestation"):
        proto_fields = set(masking_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name)
        core_fields = {f.name for f in dataclasses.fields(getattr(messages, name))}
        assert core_fields == proto_fields, name
    # the wire adds the word size to the masked input; everything the core has is on the wire
    masked = set(masking_pb2.DESCRIPTOR.message_types_by_name["MaskedInput"].fields_by_name)
    assert {f.name for f in dataclasses.fields(messages.MaskedInput)} | {"word_bits"} == masked


def test_ckks_enums_and_messages_match_the_core(ckks_pb2) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from secagg.ckks import keys
    from secagg.ckks import round as ckks_round
    from secagg.errors import RefusalReason

    stages = {v.name: v.number for v in ckks_pb2.CkksStage.DESCRIPTOR.values}
    assert stages == {
        s.name if s.name.startswith("CKKS_STAGE_") else f"CKKS_STAGE_{s.name}": s.value
        for s in ckks_round.CkksStage}
    reasons = {v.name: v.number for v in ckks_pb2.RefusalReason.DESCRIPTOR.values}
    assert reasons == {
        r.name if r.name.startswith("REFUSAL_REASON_") else f"REFUSAL_REASON_{r.name}": r.value
        for r in RefusalReason}
    for module, name in ((keys, "KeyAnnouncement"), (ckks_round, "EncryptedUpdate"),
                         (ckks_round, "EncryptedAggregate"), (ckks_round, "ReleasedAverage")):
        proto_fields = set(ckks_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name)
        core_fields = {f.name for f in dataclasses.fields(getattr(module, name))}
        assert core_fields == proto_fields, name
