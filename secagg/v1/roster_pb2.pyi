from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RosterSite(_message.Message):
    __slots__ = ("site_id", "identity_public_key")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    identity_public_key: bytes
    def __init__(self, site_id: _Optional[int] = ..., identity_public_key: _Optional[bytes] = ...) -> None: ...

class Roster(_message.Message):
    __slots__ = ("federation", "version", "sites", "graph_seed")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    federation: str
    version: int
    sites: _containers.RepeatedCompositeFieldContainer[RosterSite]
    graph_seed: bytes
    def __init__(self, federation: _Optional[str] = ..., version: _Optional[int] = ..., sites: _Optional[_Iterable[_Union[RosterSite, _Mapping]]] = ..., graph_seed: _Optional[bytes] = ...) -> None: ...

class SignedRoster(_message.Message):
    __slots__ = ("roster", "signature")
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    roster: Roster
    signature: bytes
    def __init__(self, roster: _Optional[_Union[Roster, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...
