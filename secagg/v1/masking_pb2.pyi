from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ADVERTISE_KEYS: _ClassVar[Stage]
    STAGE_SHARE_KEYS: _ClassVar[Stage]
    STAGE_MASKED_INPUT: _ClassVar[Stage]
    STAGE_CONSISTENCY_CHECK: _ClassVar[Stage]
    STAGE_UNMASK: _ClassVar[Stage]
    STAGE_COMPLETED: _ClassVar[Stage]
    STAGE_ABORTED: _ClassVar[Stage]

class AbortReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORT_REASON_UNSPECIFIED: _ClassVar[AbortReason]
    ABORT_REASON_TOO_FEW_SURVIVORS: _ClassVar[AbortReason]
    ABORT_REASON_BAD_SIGNATURE: _ClassVar[AbortReason]
    ABORT_REASON_UNKNOWN_SITE: _ClassVar[AbortReason]
    ABORT_REASON_DUPLICATE_SITE: _ClassVar[AbortReason]
    ABORT_REASON_DUPLICATE_KEY: _ClassVar[AbortReason]
    ABORT_REASON_OWN_KEY_MISSING_OR_ALTERED: _ClassVar[AbortReason]
    ABORT_REASON_WRONG_SIZE_KEY: _ClassVar[AbortReason]
    ABORT_REASON_SHARE_AUTHENTICATION_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_UNEXPECTED_SHARE_SENDER: _ClassVar[AbortReason]
    ABORT_REASON_SELF_LISTED_AS_DROPPED: _ClassVar[AbortReason]
    ABORT_REASON_PEER_BOTH_ALIVE_AND_DROPPED: _ClassVar[AbortReason]
    ABORT_REASON_PEER_ALREADY_DROPPED: _ClassVar[AbortReason]
    ABORT_REASON_SURVIVOR_LIST_MISMATCH: _ClassVar[AbortReason]
    ABORT_REASON_RECONSTRUCTION_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_MALFORMED_MESSAGE: _ClassVar[AbortReason]
    ABORT_REASON_TOO_MANY_MISSING_NEIGHBOURS: _ClassVar[AbortReason]
    ABORT_REASON_MASK_PARTNERS_INCOMPLETE: _ClassVar[AbortReason]
    ABORT_REASON_AGGREGATE_OUT_OF_RANGE: _ClassVar[AbortReason]
STAGE_UNSPECIFIED: Stage
STAGE_ADVERTISE_KEYS: Stage
STAGE_SHARE_KEYS: Stage
STAGE_MASKED_INPUT: Stage
STAGE_CONSISTENCY_CHECK: Stage
STAGE_UNMASK: Stage
STAGE_COMPLETED: Stage
STAGE_ABORTED: Stage
ABORT_REASON_UNSPECIFIED: AbortReason
ABORT_REASON_TOO_FEW_SURVIVORS: AbortReason
ABORT_REASON_BAD_SIGNATURE: AbortReason
ABORT_REASON_UNKNOWN_SITE: AbortReason
ABORT_REASON_DUPLICATE_SITE: AbortReason
ABORT_REASON_DUPLICATE_KEY: AbortReason
ABORT_REASON_OWN_KEY_MISSING_OR_ALTERED: AbortReason
ABORT_REASON_WRONG_SIZE_KEY: AbortReason
ABORT_REASON_SHARE_AUTHENTICATION_FAILED: AbortReason
ABORT_REASON_UNEXPECTED_SHARE_SENDER: AbortReason
ABORT_REASON_SELF_LISTED_AS_DROPPED: AbortReason
ABORT_REASON_PEER_BOTH_ALIVE_AND_DROPPED: AbortReason
ABORT_REASON_PEER_ALREADY_DROPPED: AbortReason
ABORT_REASON_SURVIVOR_LIST_MISMATCH: AbortReason
ABORT_REASON_RECONSTRUCTION_FAILED: AbortReason
ABORT_REASON_MALFORMED_MESSAGE: AbortReason
ABORT_REASON_TOO_MANY_MISSING_NEIGHBOURS: AbortReason
ABORT_REASON_MASK_PARTNERS_INCOMPLETE: AbortReason
ABORT_REASON_AGGREGATE_OUT_OF_RANGE: AbortReason

class AdvertiseKeys(_message.Message):
    __slots__ = ("site_id", "encryption_public_key", "masking_public_key", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASKING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    encryption_public_key: bytes
    masking_public_key: bytes
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., encryption_public_key: _Optional[bytes] = ..., masking_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("site_id", "encrypted_shares", "self_mask_commitment", "share_commitments", "signature")
    class EncryptedSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class ShareCommitmentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARE_COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    encrypted_shares: _containers.ScalarMap[int, bytes]
    self_mask_commitment: bytes
    share_commitments: _containers.ScalarMap[int, bytes]
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., encrypted_shares: _Optional[_Mapping[int, bytes]] = ..., self_mask_commitment: _Optional[bytes] = ..., share_commitments: _Optional[_Mapping[int, bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class MaskedInput(_message.Message):
    __slots__ = ("site_id", "word_bits", "masked_input", "partners", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    WORD_BITS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    PARTNERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    word_bits: int
    masked_input: bytes
    partners: _containers.RepeatedScalarFieldContainer[int]
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., word_bits: _Optional[int] = ..., masked_input: _Optional[bytes] = ..., partners: _Optional[_Iterable[int]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class MaskAttestation(_message.Message):
    __slots__ = ("partners", "payload_digest", "signature")
    PARTNERS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    partners: _containers.RepeatedScalarFieldContainer[int]
    payload_digest: bytes
    signature: bytes
    def __init__(self, partners: _Optional[_Iterable[int]] = ..., payload_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ConsistencySignature(_message.Message):
    __slots__ = ("site_id", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UnmaskResponse(_message.Message):
    __slots__ = ("site_id", "self_mask_shares", "key_shares", "signature")
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    self_mask_shares: _containers.ScalarMap[int, bytes]
    key_shares: _containers.ScalarMap[int, bytes]
    signature: bytes
    def __init__(self, site_id: _Optional[int] = ..., self_mask_shares: _Optional[_Mapping[int, bytes]] = ..., key_shares: _Optional[_Mapping[int, bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class KeyDirectory(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AdvertiseKeys]
    def __init__(self, entries: _Optional[_Iterable[_Union[AdvertiseKeys, _Mapping]]] = ...) -> None: ...

class ShareDelivery(_message.Message):
    __slots__ = ("encrypted_shares",)
    class EncryptedSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ENCRYPTED_SHARES_FIELD_NUMBER: _ClassVar[int]
    encrypted_shares: _containers.ScalarMap[int, bytes]
    def __init__(self, encrypted_shares: _Optional[_Mapping[int, bytes]] = ...) -> None: ...

class SurvivorList(_message.Message):
    __slots__ = ("survivors", "attestations")
    class AttestationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: MaskAttestation
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[MaskAttestation, _Mapping]] = ...) -> None: ...
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    ATTESTATIONS_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    attestations: _containers.MessageMap[int, MaskAttestation]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., attestations: _Optional[_Mapping[int, MaskAttestation]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "survivor_signatures", "dropped")
    class SurvivorSignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    survivor_signatures: _containers.ScalarMap[int, bytes]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., survivor_signatures: _Optional[_Mapping[int, bytes]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...
