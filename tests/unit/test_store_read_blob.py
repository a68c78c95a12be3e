"""A payload the aggregator reads back from its store (a masked input, an upload, a model)
is exactly the bytes its reference names: a chunk missing, or chunks that do not add up to
its size, is a StoreError (the job reloads; the call is UNAVAILABLE), never a shorter or
longer payload handed to the protocol roles."""

from __future__ import annotations

import hashlib

import pytest

from aggregator.store import BlobRef, Store, StoreError


def test_a_payload_read_back_is_exactly_its_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = Store(str(tmp_path / "aggregator.db"))
    try:
        data = bytes(range(256)) * 40
        blob = store.write_blob(data, chunk_bytes=4096, round_number=None)
        assert len(blob.chunk_ids) == 3
        assert store.read_blob(blob) == data
        absent = hashlib.sha256(b"never stored").digest()
        # a chunk missing (a reference to a chunk the store lost or never had), even where
        # the sizes of the rest would add up to the size named
        with pytest.raises(StoreError, match="missing"):
            store.read_blob(BlobRef((*blob.chunk_ids[:2], absent), 8192))
        # the chunks there, their bytes not the size named (longer or shorter)
        for size in (len(data) - 1, len(data) + 1):
            with pytest.raises(StoreError, match="wrong size"):
                store.read_blob(BlobRef(blob.chunk_ids, size))
    finally:
        store.close()
