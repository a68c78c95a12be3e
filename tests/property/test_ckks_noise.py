"""The CKKS noise bound used for release holds, and the release lands on its grid."""

from __future__ import annotations

import numpy as np
import pytest
from tenseal import sealapi

from secagg.ckks import KeyHolder, get_preset
from secagg.ckks._chunks import ChunkEncryptor
from secagg.ckks._seal import load_ciphertext


@pytest.mark.parametrize("preset", ["add-only-4096", "nvflare-default"])
@pytest.mark.parametrize("seeded", [False, True])
def test_measured_sum_error_stays_below_the_noise_bound(preset: str, seeded: bool) -> None:
    p = get_preset(preset)
    holder = KeyHolder.generate(preset)
    ctx = holder.seal_context
    enc = (ChunkEncryptor(ctx, p.scale, secret_key=holder.secret_key) if seeded
           else ChunkEncryptor(ctx, p.scale, public_key=holder.public_key))
    evaluator = sealapi.Evaluator(ctx)
    decryptor = sealapi.Decryptor(ctx, holder.secret_key)
    encoder = sealapi.CKKSEncoder(ctx)
    rng = np.random.default_rng(1)
    total = np.zeros(p.slots)
    acc = None
    for n in range(1, 21):
        x = rng.uniform(-1, 1, p.slots)
        total += x
        ct = load_ciphertext(ctx, enc.encrypt_row(x), scale=p.scale)
        if acc is None:
            acc = ct
        else:
            evaluator.add_inplace(acc, ct)
        if n in (1, 5, 20):
            plain = sealapi.Plaintext()
            decryptor.decrypt(acc, plain)
            values = np.array(encoder.decode_complex(plain))
            err = float(np.max(np.abs(values.real - total)))
            assert err < p.noise_bound(n), (n, err, p.noise_bound(n))
            # the release refuses imaginary parts above the bound: honest ones stay below
            assert float(np.max(np.abs(values.imag))) < p.noise_bound(n)
