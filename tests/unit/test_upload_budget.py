"""The per-site upload budget (Job.upload_limit, charged by UploadBudget: each chunk its bytes
and CHUNK_STORAGE_COST) holds what an honest site sends, sent twice (once more after the
aggregator lost chunks), for every preset and protocol up to [limits] max_vector_length; and
not much more."""

from __future__ import annotations

import types

import pytest

from aggregator.job import CHUNK_STORAGE_COST, Job
from secagg.ckks import KeyHolder, _seal
from secagg.ckks.keys import public_context_length
from secagg.ckks.presets import PRESETS
from secagg.federation.config import SDK_CHUNK_BYTES, Limits


def _charged(nbytes: int) -> int:
    """What the service charges for an upload of ``nbytes`` in the SDK's chunks."""
    chunks = max(1, -(-nbytes // SDK_CHUNK_BYTES))
    return nbytes + chunks * CHUNK_STORAGE_COST


def _limit(protocol: str, size: int, *, preset: str = "add-only-4096", word_bits: int = 32,
           holder: bool = False) -> int:
    view = types.SimpleNamespace(model=types.SimpleNamespace(size=size), protocol=protocol,
                                 ckks_key_holder=1 if holder else 2)
    job = types.SimpleNamespace(active=types.SimpleNamespace(view=view),
                                config=types.SimpleNamespace(preset=preset, word_bits=word_bits))
    return Job.upload_limit(job, 1)  # type: ignore[arg-type]


SIZES = [1, 1000, 1_000_000, 17_000_000, Limits().max_vector_length]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("holder", [False, True])
def test_an_honest_ckks_upload_fits_twice(preset: str, size: int, holder: bool) -> None:
    context = KeyHolder.generate(preset).public_context()
    slots = PRESETS[preset].slots
    ciphertexts = -(-(size + 1) // slots) * _seal.encoded_length(context.seal_context,
                                                                 _seal.Kind.FULL)
    sent = [ciphertexts]
    if holder:
        sent += [public_context_length(preset), 8 * size]
    honest = sum(_charged(n) for n in sent)
    limit = _limit("ckks", size, preset=preset, holder=holder)
    assert 2 * honest <= limit <= 2 * honest + (17 << 20)


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("size", SIZES)
def test_an_honest_masked_input_fits_twice(size: int, word_bits: int) -> None:
    honest = _charged((size + 1) * word_bits // 8)
    limit = _limit("masking", size, word_bits=word_bits)
    assert 2 * honest <= limit <= 2 * honest + (17 << 20)
