from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CkksStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CKKS_STAGE_UNSPECIFIED: _ClassVar[CkksStage]
    CKKS_STAGE_UPLOAD: _ClassVar[CkksStage]
    CKKS_STAGE_RELEASE: _ClassVar[CkksStage]
    CKKS_STAGE_COMPLETED: _ClassVar[CkksStage]
    CKKS_STAGE_ABORTED: _ClassVar[CkksStage]
    CKKS_STAGE_KEY_ANNOUNCEMENT: _ClassVar[CkksStage]

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_WRONG_ROUND: _ClassVar[RefusalReason]
    REFUSAL_REASON_WRONG_KEY_ID: _ClassVar[RefusalReason]
    REFUSAL_REASON_UNKNOWN_SITE: _ClassVar[RefusalReason]
    REFUSAL_REASON_DUPLICATE_SITE: _ClassVar[RefusalReason]
    REFUSAL_REASON_WRONG_SHAPE: _ClassVar[RefusalReason]
    REFUSAL_REASON_CONTEXT_HAS_SECRET_KEY: _ClassVar[RefusalReason]
    REFUSAL_REASON_ALREADY_RELEASED: _ClassVar[RefusalReason]
    REFUSAL_REASON_KEY_EXHAUSTED: _ClassVar[RefusalReason]
    REFUSAL_REASON_AGGREGATE_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_OUT_OF_RANGE: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_THE_RELEASING_HOLDER: _ClassVar[RefusalReason]
CKKS_STAGE_UNSPECIFIED: CkksStage
CKKS_STAGE_UPLOAD: CkksStage
CKKS_STAGE_RELEASE: CkksStage
CKKS_STAGE_COMPLETED: CkksStage
CKKS_STAGE_ABORTED: CkksStage
CKKS_STAGE_KEY_ANNOUNCEMENT: CkksStage
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_WRONG_ROUND: RefusalReason
REFUSAL_REASON_WRONG_KEY_ID: RefusalReason
REFUSAL_REASON_UNKNOWN_SITE: RefusalReason
REFUSAL_REASON_DUPLICATE_SITE: RefusalReason
REFUSAL_REASON_WRONG_SHAPE: RefusalReason
REFUSAL_REASON_CONTEXT_HAS_SECRET_KEY: RefusalReason
REFUSAL_REASON_ALREADY_RELEASED: RefusalReason
REFUSAL_REASON_KEY_EXHAUSTED: RefusalReason
REFUSAL_REASON_AGGREGATE_MISMATCH: RefusalReason
REFUSAL_REASON_OUT_OF_RANGE: RefusalReason
REFUSAL_REASON_NOT_THE_RELEASING_HOLDER: RefusalReason

class KeyAnnouncement(_message.Message):
    __slots__ = ("key_id", "preset", "holder", "epoch", "max_rounds", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    preset: str
    holder: int
    epoch: str
    max_rounds: int
    signature: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., preset: _Optional[str] = ..., holder: _Optional[int] = ..., epoch: _Optional[str] = ..., max_rounds: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedUpdate(_message.Message):
    __slots__ = ("round_id", "key_id", "site_id", "chunks", "seeded", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    key_id: bytes
    site_id: int
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    seeded: bool
    signature: bytes
    def __init__(self, round_id: _Optional[str] = ..., key_id: _Optional[bytes] = ..., site_id: _Optional[int] = ..., chunks: _Optional[_Iterable[bytes]] = ..., seeded: _Optional[bool] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedAggregate(_message.Message):
    __slots__ = ("round_id", "key_id", "sites", "chunks")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    key_id: bytes
    sites: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, round_id: _Optional[str] = ..., key_id: _Optional[bytes] = ..., sites: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleasedAverage(_message.Message):
    __slots__ = ("average", "weight_sum", "round_id", "sites", "grid")
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    average: _containers.RepeatedScalarFieldContainer[float]
    weight_sum: float
    round_id: str
    sites: _containers.RepeatedScalarFieldContainer[int]
    grid: float
    def __init__(self, average: _Optional[_Iterable[float]] = ..., weight_sum: _Optional[float] = ..., round_id: _Optional[str] = ..., sites: _Optional[_Iterable[int]] = ..., grid: _Optional[float] = ...) -> None: ...
