from secagg.v1 import ckks_pb2 as _ckks_pb2
from secagg.v1 import masking_pb2 as _masking_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_MASKING: _ClassVar[Protocol]
    PROTOCOL_CKKS: _ClassVar[Protocol]

class RoundStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATUS_UNSPECIFIED: _ClassVar[RoundStatus]
    ROUND_STATUS_RUNNING: _ClassVar[RoundStatus]
    ROUND_STATUS_COMPLETED: _ClassVar[RoundStatus]
    ROUND_STATUS_ABORTED: _ClassVar[RoundStatus]
    ROUND_STATUS_JOB_DONE: _ClassVar[RoundStatus]
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_MASKING: Protocol
PROTOCOL_CKKS: Protocol
ROUND_STATUS_UNSPECIFIED: RoundStatus
ROUND_STATUS_RUNNING: RoundStatus
ROUND_STATUS_COMPLETED: RoundStatus
ROUND_STATUS_ABORTED: RoundStatus
ROUND_STATUS_JOB_DONE: RoundStatus

class Chunk(_message.Message):
    __slots__ = ("chunk_id", "data")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    chunk_id: bytes
    data: bytes
    def __init__(self, chunk_id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ChunkIds(_message.Message):
    __slots__ = ("chunk_ids",)
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, chunk_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutChunksResponse(_message.Message):
    __slots__ = ("stored", "already_present")
    STORED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    stored: int
    already_present: int
    def __init__(self, stored: _Optional[int] = ..., already_present: _Optional[int] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("chunk_ids", "size")
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[bytes]
    size: int
    def __init__(self, chunk_ids: _Optional[_Iterable[bytes]] = ..., size: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("spec", "data", "digest")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    spec: _containers.RepeatedCompositeFieldContainer[Tensor]
    data: Blob
    digest: bytes
    def __init__(self, spec: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., data: _Optional[_Union[Blob, _Mapping]] = ..., digest: _Optional[bytes] = ...) -> None: ...

class CkksKeyOffer(_message.Message):
    __slots__ = ("announcement", "public_context")
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    announcement: _ckks_pb2.KeyAnnouncement
    public_context: Blob
    def __init__(self, announcement: _Optional[_Union[_ckks_pb2.KeyAnnouncement, _Mapping]] = ..., public_context: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("after_round", "wait_ms", "until_finished")
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FINISHED_FIELD_NUMBER: _ClassVar[int]
    after_round: int
    wait_ms: int
    until_finished: bool
    def __init__(self, after_round: _Optional[int] = ..., wait_ms: _Optional[int] = ..., until_finished: _Optional[bool] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "round_id", "protocol", "status", "model", "stage", "ckks_key_holder", "ckks_key", "abort_reason", "result", "total_rounds", "survivors", "result_signature", "settings_digest", "roster_digest", "roster_version", "sites_signature", "waiting")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CKKS_KEY_HOLDER_FIELD_NUMBER: _ClassVar[int]
    CKKS_KEY_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    RESULT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ROSTER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ROSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SITES_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    round: int
    round_id: str
    protocol: Protocol
    status: RoundStatus
    model: Model
    stage: int
    ckks_key_holder: int
    ckks_key: CkksKeyOffer
    abort_reason: str
    result: Model
    total_rounds: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    result_signature: bytes
    settings_digest: bytes
    roster_digest: bytes
    roster_version: int
    sites_signature: bytes
    waiting: RoundWaiting
    def __init__(self, round: _Optional[int] = ..., round_id: _Optional[str] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., status: _Optional[_Union[RoundStatus, str]] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., stage: _Optional[int] = ..., ckks_key_holder: _Optional[int] = ..., ckks_key: _Optional[_Union[CkksKeyOffer, _Mapping]] = ..., abort_reason: _Optional[str] = ..., result: _Optional[_Union[Model, _Mapping]] = ..., total_rounds: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., result_signature: _Optional[bytes] = ..., settings_digest: _Optional[bytes] = ..., roster_digest: _Optional[bytes] = ..., roster_version: _Optional[int] = ..., sites_signature: _Optional[bytes] = ..., waiting: _Optional[_Union[RoundWaiting, _Mapping]] = ...) -> None: ...

class RoundWaiting(_message.Message):
    __slots__ = ("sites_asking", "sites_needed", "waits_for_key_holder")
    SITES_ASKING_FIELD_NUMBER: _ClassVar[int]
    SITES_NEEDED_FIELD_NUMBER: _ClassVar[int]
    WAITS_FOR_KEY_HOLDER_FIELD_NUMBER: _ClassVar[int]
    sites_asking: int
    sites_needed: int
    waits_for_key_holder: bool
    def __init__(self, sites_asking: _Optional[int] = ..., sites_needed: _Optional[int] = ..., waits_for_key_holder: _Optional[bool] = ...) -> None: ...

class MaskedInputRef(_message.Message):
    __slots__ = ("site_id", "word_bits", "masked_input", "partners", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    WORD_BITS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    PARTNERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    word_bits: int
    masked_input: Blob
    partners: _containers.RepeatedScalarFieldContainer[int]
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., word_bits: _Optional[int] = ..., masked_input: _Optional[_Union[Blob, _Mapping]] = ..., partners: _Optional[_Iterable[int]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedUpdateRef(_message.Message):
    __slots__ = ("round_id", "key_id", "site_id", "chunks", "chunk_count", "seeded", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    key_id: bytes
    site_id: int
    chunks: Blob
    chunk_count: int
    seeded: bool
    signature: bytes
    def __init__(self, round_id: _Optional[str] = ..., key_id: _Optional[bytes] = ..., site_id: _Optional[int] = ..., chunks: _Optional[_Union[Blob, _Mapping]] = ..., chunk_count: _Optional[int] = ..., seeded: _Optional[bool] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedAggregateRef(_message.Message):
    __slots__ = ("round_id", "key_id", "sites", "chunks", "chunk_count")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    key_id: bytes
    sites: _containers.RepeatedScalarFieldContainer[int]
    chunks: Blob
    chunk_count: int
    def __init__(self, round_id: _Optional[str] = ..., key_id: _Optional[bytes] = ..., sites: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Union[Blob, _Mapping]] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class ReleasedAverageRef(_message.Message):
    __slots__ = ("average", "weight_sum", "sites", "grid", "result_signature", "sites_signature")
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    RESULT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SITES_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    average: Blob
    weight_sum: float
    sites: _containers.RepeatedScalarFieldContainer[int]
    grid: float
    result_signature: bytes
    sites_signature: bytes
    def __init__(self, average: _Optional[_Union[Blob, _Mapping]] = ..., weight_sum: _Optional[float] = ..., sites: _Optional[_Iterable[int]] = ..., grid: _Optional[float] = ..., result_signature: _Optional[bytes] = ..., sites_signature: _Optional[bytes] = ...) -> None: ...

class CkksReleaseRefusal(_message.Message):
    __slots__ = ("reason", "signature")
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    reason: _ckks_pb2.RefusalReason
    signature: bytes
    def __init__(self, reason: _Optional[_Union[_ckks_pb2.RefusalReason, str]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CkksReleaseRequest(_message.Message):
    __slots__ = ("aggregate", "uploads")
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    aggregate: EncryptedAggregateRef
    uploads: _containers.RepeatedCompositeFieldContainer[EncryptedUpdateRef]
    def __init__(self, aggregate: _Optional[_Union[EncryptedAggregateRef, _Mapping]] = ..., uploads: _Optional[_Iterable[_Union[EncryptedUpdateRef, _Mapping]]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("round_id", "advertise_keys", "share_keys", "masked_input", "consistency_signature", "unmask_response", "ckks_key", "ckks_update", "ckks_release", "ckks_refusal")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CKKS_KEY_FIELD_NUMBER: _ClassVar[int]
    CKKS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    CKKS_RELEASE_FIELD_NUMBER: _ClassVar[int]
    CKKS_REFUSAL_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    advertise_keys: _masking_pb2.AdvertiseKeys
    share_keys: _masking_pb2.ShareKeys
    masked_input: MaskedInputRef
    consistency_signature: _masking_pb2.ConsistencySignature
    unmask_response: _masking_pb2.UnmaskResponse
    ckks_key: CkksKeyOffer
    ckks_update: EncryptedUpdateRef
    ckks_release: ReleasedAverageRef
    ckks_refusal: CkksReleaseRefusal
    def __init__(self, round_id: _Optional[str] = ..., advertise_keys: _Optional[_Union[_masking_pb2.AdvertiseKeys, _Mapping]] = ..., share_keys: _Optional[_Union[_masking_pb2.ShareKeys, _Mapping]] = ..., masked_input: _Optional[_Union[MaskedInputRef, _Mapping]] = ..., consistency_signature: _Optional[_Union[_masking_pb2.ConsistencySignature, _Mapping]] = ..., unmask_response: _Optional[_Union[_masking_pb2.UnmaskResponse, _Mapping]] = ..., ckks_key: _Optional[_Union[CkksKeyOffer, _Mapping]] = ..., ckks_update: _Optional[_Union[EncryptedUpdateRef, _Mapping]] = ..., ckks_release: _Optional[_Union[ReleasedAverageRef, _Mapping]] = ..., ckks_refusal: _Optional[_Union[CkksReleaseRefusal, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class ReceiveRequest(_message.Message):
    __slots__ = ("round_id", "stage", "wait_ms")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    stage: int
    wait_ms: int
    def __init__(self, round_id: _Optional[str] = ..., stage: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class ReceiveResponse(_message.Message):
    __slots__ = ("ready", "key_directory", "share_delivery", "survivor_list", "unmask_request", "ckks_release_request", "waiting")
    READY_FIELD_NUMBER: _ClassVar[int]
    KEY_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    SHARE_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_LIST_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CKKS_RELEASE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    key_directory: _masking_pb2.KeyDirectory
    share_delivery: _masking_pb2.ShareDelivery
    survivor_list: _masking_pb2.SurvivorList
    unmask_request: _masking_pb2.UnmaskRequest
    ckks_release_request: CkksReleaseRequest
    waiting: RoundWaiting
    def __init__(self, ready: _Optional[bool] = ..., key_directory: _Optional[_Union[_masking_pb2.KeyDirectory, _Mapping]] = ..., share_delivery: _Optional[_Union[_masking_pb2.ShareDelivery, _Mapping]] = ..., survivor_list: _Optional[_Union[_masking_pb2.SurvivorList, _Mapping]] = ..., unmask_request: _Optional[_Union[_masking_pb2.UnmaskRequest, _Mapping]] = ..., ckks_release_request: _Optional[_Union[CkksReleaseRequest, _Mapping]] = ..., waiting: _Optional[_Union[RoundWaiting, _Mapping]] = ...) -> None: ...
