"""Conversions between the core's message values and their protobuf form (``protos/secagg/v1``).

Both ends of the service use these, so a message means the same thing on either side. Bulk
payloads are not converted here: a message refers to them as a :class:`Blob` (chunk ids and
size), and the caller fetches the bytes; ``*_from_proto`` functions that need a payload take
its bytes. Decoding checks shapes (lengths, counts); the roles check meaning (signatures,
roster membership). A malformed message is :class:`~secagg.errors.InvalidMessage`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from secagg._encoding import encode
from secagg.ckks.keys import KeyAnnouncement
from secagg.ckks.round import EncryptedAggregate, EncryptedUpdate, ReleasedAverage
from secagg.errors import InvalidMessage
from secagg.hazmat import signing
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    KeyDirectory,
    MaskAttestation,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.model import MAX_MODEL_TENSORS, MAX_TENSOR_DIMS, FlatModel, TensorSpec
from secagg.v1 import ckks_pb2, masking_pb2, service_pb2

WORD_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


@dataclass(frozen=True)
class Blob:
    chunk_ids: tuple[bytes, ...]
    size: int

    def to_proto(self) -> service_pb2.Blob:
        return service_pb2.Blob(chunk_ids=list(self.chunk_ids), size=self.size)

    @classmethod
    def from_proto(cls, msg: service_pb2.Blob) -> Blob:
        ids = tuple(bytes(c) for c in msg.chunk_ids)
        if any(len(c) != 32 for c in ids) or (msg.size > 0 and not ids):
            raise InvalidMessage("blob")
        return cls(ids, int(msg.size))


# ---- masking: site -> server ----------------------------------------------------------------


def advertise_to_proto(m: AdvertiseKeys) -> masking_pb2.AdvertiseKeys:
    return masking_pb2.AdvertiseKeys(site_id=m.site_id,
                                     encryption_public_key=m.encryption_public_key,
                                     masking_public_key=m.masking_public_key, signature=m.signature)


def advertise_from_proto(p: masking_pb2.AdvertiseKeys) -> AdvertiseKeys:
    return AdvertiseKeys(int(p.site_id), bytes(p.encryption_public_key),
                         bytes(p.masking_public_key), bytes(p.signature))


def share_keys_to_proto(m: ShareKeys) -> masking_pb2.ShareKeys:
    return masking_pb2.ShareKeys(site_id=m.site_id, encrypted_shares=dict(m.encrypted_shares),
                                 self_mask_commitment=m.self_mask_commitment,
                                 share_commitments=dict(m.share_commitments),
                                 signature=m.signature)


def share_keys_from_proto(p: masking_pb2.ShareKeys) -> ShareKeys:
    return ShareKeys(int(p.site_id), {int(k): bytes(v) for k, v in p.encrypted_shares.items()},
                     bytes(p.self_mask_commitment),
                     {int(k): bytes(v) for k, v in p.share_commitments.items()},
                     bytes(p.signature))


def masked_input_to_ref(m: MaskedInput, blob: Blob, word_bits: int) -> service_pb2.MaskedInputRef:
    return service_pb2.MaskedInputRef(site_id=m.site_id, word_bits=word_bits,
                                      masked_input=blob.to_proto(), partners=list(m.partners),
                                      signature=m.signature)


def masked_input_bytes(m: MaskedInput, word_bits: int) -> bytes:
    return bytes(np.ascontiguousarray(m.masked_input).astype(WORD_DTYPES[word_bits]).tobytes())


def masked_input_from_ref(p: service_pb2.MaskedInputRef, data: bytes, *, word_bits: int,
                          length: int) -> MaskedInput:
    dtype = WORD_DTYPES.get(p.word_bits)
    if dtype is None or p.word_bits != word_bits or len(data) != length * dtype.itemsize:
        raise InvalidMessage("masked input")
    words = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
    return MaskedInput(int(p.site_id), words, tuple(int(x) for x in p.partners),
                       bytes(p.signature))


def consistency_to_proto(m: ConsistencySignature) -> masking_pb2.ConsistencySignature:
    return masking_pb2.ConsistencySignature(site_id=m.site_id, signature=m.signature)


def consistency_from_proto(p: masking_pb2.ConsistencySignature) -> ConsistencySignature:
    return ConsistencySignature(int(p.site_id), bytes(p.signature))


def unmask_to_proto(m: UnmaskResponse) -> masking_pb2.UnmaskResponse:
    return masking_pb2.UnmaskResponse(site_id=m.site_id, self_mask_shares=dict(m.self_mask_shares),
                                      key_shares=dict(m.key_shares), signature=m.signature)


def unmask_from_proto(p: masking_pb2.UnmaskResponse) -> UnmaskResponse:
    return UnmaskResponse(int(p.site_id),
                          {int(k): bytes(v) for k, v in p.self_mask_shares.items()},
                          {int(k): bytes(v) for k, v in p.key_shares.items()}, bytes(p.signature))


# ---- masking: server -> site ----------------------------------------------------------------


def directory_to_proto(m: KeyDirectory) -> masking_pb2.KeyDirectory:
    return masking_pb2.KeyDirectory(entries=[advertise_to_proto(e) for e in m.entries])


def directory_from_proto(p: masking_pb2.KeyDirectory) -> KeyDirectory:
    return KeyDirectory(tuple(advertise_from_proto(e) for e in p.entries))


def delivery_to_proto(m: ShareDelivery) -> masking_pb2.ShareDelivery:
    return masking_pb2.ShareDelivery(encrypted_shares=dict(m.encrypted_shares))


def delivery_from_proto(p: masking_pb2.ShareDelivery) -> ShareDelivery:
    return ShareDelivery({int(k): bytes(v) for k, v in p.encrypted_shares.items()})


def survivors_to_proto(m: SurvivorList) -> masking_pb2.SurvivorList:
    return masking_pb2.SurvivorList(
        survivors=list(m.survivors),
        attestations={k: masking_pb2.MaskAttestation(partners=list(a.partners),
                                                     payload_digest=a.payload_digest,
                                                     signature=a.signature)
                      for k, a in m.attestations.items()})


def survivors_from_proto(p: masking_pb2.SurvivorList) -> SurvivorList:
    return SurvivorList(tuple(int(s) for s in p.survivors), {
        int(k): MaskAttestation(tuple(int(x) for x in a.partners), bytes(a.payload_digest),
                                bytes(a.signature))
        for k, a in p.attestations.items()})


def unmask_request_to_proto(m: UnmaskRequest) -> masking_pb2.UnmaskRequest:
    return masking_pb2.UnmaskRequest(survivors=list(m.survivors),
                                     survivor_signatures=dict(m.survivor_signatures),
                                     dropped=list(m.dropped))


def unmask_request_from_proto(p: masking_pb2.UnmaskRequest) -> UnmaskRequest:
    return UnmaskRequest(tuple(int(s) for s in p.survivors),
                         {int(k): bytes(v) for k, v in p.survivor_signatures.items()},
                         tuple(int(s) for s in p.dropped))


# ---- CKKS ------------------------------------------------------------------------------------


def announcement_to_proto(a: KeyAnnouncement) -> ckks_pb2.KeyAnnouncement:
    return ckks_pb2.KeyAnnouncement(key_id=a.key_id, preset=a.preset, holder=a.holder,
                                    epoch=a.epoch, max_rounds=a.max_rounds,
                                    signature=a.signature)


def announcement_from_proto(p: ckks_pb2.KeyAnnouncement) -> KeyAnnouncement:
    return KeyAnnouncement(bytes(p.key_id), p.preset, int(p.holder), p.epoch,
                           int(p.max_rounds), bytes(p.signature))


def split_fixed(data: bytes, count: int) -> tuple[bytes, ...]:
    """``count`` equal pieces of ``data`` (canonical ciphertexts have a fixed length)."""
    # defence: wire.split-bounded
    if count < 1 or count > len(data) or len(data) % count:
        raise InvalidMessage("ciphertext payload")
    size = len(data) // count
    return tuple(data[i * size:(i + 1) * size] for i in range(count))


def update_to_ref(u: EncryptedUpdate, blob: Blob) -> service_pb2.EncryptedUpdateRef:
    return service_pb2.EncryptedUpdateRef(round_id=u.round_id, key_id=u.key_id,
                                          site_id=u.site_id, chunks=blob.to_proto(),
                                          chunk_count=len(u.chunks), seeded=u.seeded,
                                          signature=u.signature)


def update_from_ref(p: service_pb2.EncryptedUpdateRef, data: bytes) -> EncryptedUpdate:
    return EncryptedUpdate(p.round_id, bytes(p.key_id), int(p.site_id),
                           split_fixed(data, int(p.chunk_count)), bool(p.seeded),
                           bytes(p.signature))


def aggregate_to_ref(a: EncryptedAggregate, blob: Blob) -> service_pb2.EncryptedAggregateRef:
    return service_pb2.EncryptedAggregateRef(round_id=a.round_id, key_id=a.key_id,
                                             sites=list(a.sites), chunks=blob.to_proto(),
                                             chunk_count=len(a.chunks))


def aggregate_from_ref(p: service_pb2.EncryptedAggregateRef, data: bytes) -> EncryptedAggregate:
    return EncryptedAggregate(p.round_id, bytes(p.key_id), tuple(int(s) for s in p.sites),
                              split_fixed(data, int(p.chunk_count)))


def average_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


def release_to_ref(r: ReleasedAverage, blob: Blob, *, result_signature: bytes = b"",
                   sites_signature: bytes = b"") -> service_pb2.ReleasedAverageRef:
    return service_pb2.ReleasedAverageRef(average=blob.to_proto(), weight_sum=r.weight_sum,
                                          sites=list(r.sites), grid=r.grid,
                                          result_signature=result_signature,
                                          sites_signature=sites_signature)


def result_signed_bytes(round_id: str, model_digest: bytes, result_digest: bytes) -> bytes:
    """What a CKKS round's key holder signs once it has released the average: the model the
    round started from and the model its release makes (the round's model plus the server
    learning rate times the average), which the aggregator must publish. Only the key holder
    and the aggregator see the average; the signature lets every other site check that the
    published result is the one the release makes, with nothing but the roster."""
    # defence: wire.result-signature-binds-round, wire.result-signature-binds-model
    return encode("ckks-round-result", round_id, model_digest, result_digest)


def verify_result(public_key: bytes, signature: bytes, *, round_id: str, model_digest: bytes,
                  result_digest: bytes) -> None:
    """InvalidMessage unless ``public_key`` (the key holder's roster key) signed this result."""
    signing.verify(public_key, bytes(signature),
                   result_signed_bytes(round_id, model_digest, result_digest))


def sites_signed_bytes(round_id: str, result_digest: bytes, sites: Sequence[int]) -> bytes:
    """What a CKKS round's key holder signs beside the result: the sites whose uploads it
    verified and released, sorted, with the round and the result (a round id repeats in a
    job id reused on a fresh store; the result does not). The result signature does not cover
    them (and a change to what it signs would void every stored one), so before this the
    other sites reported the aggregator's word for who their update was averaged with.
    InvalidMessage for a site id no roster holds (an int64 is what encode takes)."""
    ids = sorted(int(s) for s in sites)
    # defence: wire.sites-ids-in-range
    if any(not 0 < s < 2**63 for s in ids):
        raise InvalidMessage("site ids")
    # defence: wire.sites-signature-binds-the-round
    return encode("ckks-round-sites", round_id, result_digest, ids)


def verify_sites(public_key: bytes, signature: bytes, *, round_id: str, result_digest: bytes,
                 sites: Sequence[int]) -> None:
    """InvalidMessage unless ``public_key`` (the key holder's roster key) signed these sites
    for this round and result."""
    signing.verify(public_key, bytes(signature),
                   sites_signed_bytes(round_id, result_digest, sites))


def refusal_signed_bytes(params_digest: bytes, site_id: int, reason: int,
                         aggregate_chunk_ids: Sequence[bytes]) -> bytes:
    """What a CKKS round's key holder signs when it refuses the sum it was asked to release:
    the round's parameters (its id, roster, key and settings), its own id, the reason (a
    RefusalReason value; service.proto: CkksReleaseRefusal) and the sum it refuses (the
    chunk ids of the aggregate's ciphertexts, each the SHA-256 of its bytes), so a stored
    refusal says which sum was refused and none is signed before the sum is seen."""
    # defence: wire.refusal-signature-binds-the-round, wire.refusal-signature-binds-the-sum
    return encode("ckks-release-refusal", params_digest, site_id, reason,
                  hashlib.sha256(b"".join(bytes(c) for c in aggregate_chunk_ids)).digest())


def verify_refusal(public_key: bytes, signature: bytes, *, params_digest: bytes,
                   site_id: int, reason: int, aggregate_chunk_ids: Sequence[bytes]) -> None:
    """InvalidMessage unless ``public_key`` (the key holder's roster key) signed this refusal."""
    signing.verify(public_key, bytes(signature),
                   refusal_signed_bytes(params_digest, site_id, reason, aggregate_chunk_ids))


def release_from_ref(p: service_pb2.ReleasedAverageRef, data: bytes, *, round_id: str,
                     length: int) -> ReleasedAverage:
    if len(data) != 8 * length:
        raise InvalidMessage("released average")
    values = np.frombuffer(data, dtype="<f8").astype(np.float64)
    # defence: wire.release-weight-sum
    if not np.all(np.isfinite(values)) or not np.isfinite(p.weight_sum) or p.weight_sum <= 0:
        raise InvalidMessage("released average")
    # the grid the key holder rounded to (a power of two; reported to operators and users)
    # defence: wire.release-grid
    if not np.isfinite(p.grid) or p.grid <= 0:
        raise InvalidMessage("released average")
    return ReleasedAverage(values, float(p.weight_sum), round_id,
                           tuple(int(s) for s in p.sites), float(p.grid))


# ---- models ----------------------------------------------------------------------------------


def model_to_proto(model: FlatModel, blob: Blob) -> service_pb2.Model:
    return service_pb2.Model(
        spec=[service_pb2.Tensor(name=t.name, shape=list(t.shape), dtype=t.dtype)
              for t in model.spec],
        data=blob.to_proto(), digest=model.digest)


def spec_from_proto(tensors: Sequence[service_pb2.Tensor]) -> tuple[TensorSpec, ...]:
    # counted before a tensor is read (secagg.model.MAX_MODEL_TENSORS)
    # defence: wire.spec-tensor-count-bounded
    if len(tensors) > MAX_MODEL_TENSORS:
        raise InvalidMessage("model spec")
    # and each tensor's dims before they are (a shape of 8.3 million dims of 1, whose
    # product is 1, cost a site 203 MB and a second to refuse)
    # defence: wire.spec-dims-counted-first
    if any(len(t.shape) > MAX_TENSOR_DIMS for t in tensors):
        raise InvalidMessage("model spec")
    try:
        return tuple(TensorSpec(t.name, tuple(int(d) for d in t.shape), np.dtype(t.dtype).name)
                     for t in tensors)
    except (TypeError, ValueError, OverflowError):  # an unknown dtype, an impossible shape
        raise InvalidMessage("model spec") from None


def check_model_parts(p: service_pb2.Model, spec: tuple[TensorSpec, ...],
                      parts: list[bytes]) -> None:
    """InvalidMessage unless ``parts``, joined, are a model of ``spec`` hashing to the
    digest ``p`` claims; checked without joining them (FlatModel.digest_of_parts)."""
    try:
        if FlatModel.digest_of_parts(spec, parts) != bytes(p.digest):
            raise InvalidMessage("model")
    except ValueError:
        raise InvalidMessage("model") from None


def model_from_proto(p: service_pb2.Model, data: bytes) -> FlatModel:
    """The model, if its bytes and spec hash to the digest it claims."""
    spec = spec_from_proto(p.spec)
    try:
        model = FlatModel.from_bytes(spec, data)
    # defence: wire.model-bytes-invalid-message
    except ValueError:
        raise InvalidMessage("model") from None
    if model.digest != bytes(p.digest):
        raise InvalidMessage("model")
    # (a model whose values its tensors cannot hold, 1e39 in a float32 weight, would load as
    # infinities and wreck the site's training: FlatModel refuses one when it is made, above)
    return model
