"""``secagg bench masking``: one in-process masking round, with the machine's limits beside it.

``limit_ratio = round_s / (aes_keystream_s + plain_sum_s)`` where ``aes_keystream_s`` is the
time raw AES-256-CTR takes, in this run, to produce exactly the mask bytes the round generated
and regenerated (one key per mask, as the round uses), and ``plain_sum_s`` the time numpy takes
to add the same sites' plaintext vectors. Sites run one after another in this process.

With ``workers > 1`` every role shares mask expansion with ``workers - 1`` helper processes
(a :class:`RangeSplitMasker`, started before the round as a service would keep it warm), and
``aes_keystream_s`` is measured on the same number of processes, so the ratio stays a ratio
to this machine's limit; ``aes_keystream_1proc_s`` is the one-process figure.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.hazmat.prg import RangeSplitMasker
from secagg.masking import RoundConfig, Stage, make_roster, simulate_round


def _ready() -> None:
    pass


def raw_keystream_seconds(total_bytes: int, chunk_bytes: int, processes: int = 1) -> float:
    """Wall time for ``processes`` processes to produce ``total_bytes`` of keystream together."""
    if processes == 1:
        return _keystream(total_bytes, chunk_bytes)
    share = -(-total_bytes // processes)
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for f in [pool.submit(_ready) for _ in range(processes)]:
            f.result()  # started and warm before timing
        began = time.perf_counter()
        list(pool.map(_keystream, [share] * processes, [chunk_bytes] * processes))
        return time.perf_counter() - began


def _keystream(total_bytes: int, chunk_bytes: int) -> float:
    """Time to produce ``total_bytes`` of AES-256-CTR keystream, a fresh key per chunk."""
    zeros = bytearray(chunk_bytes)
    buf = bytearray(chunk_bytes + 16)
    done = 0
    key = bytearray(32)
    began = time.perf_counter()
    while done < total_bytes:
        n = min(chunk_bytes, total_bytes - done)
        key[:8] = done.to_bytes(8, "little")
        enc = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(16))).encryptor()
        enc.update_into(memoryview(zeros)[:n], buf)
        done += n
    return time.perf_counter() - began


def run(clients: int, params: int, dropout: float, neighbors: int | str | None,
        threshold: int | None, seed: int, quiet: bool, workers: int = 1,
        corrupt_fraction: float = 0.2, dropout_rate: float | None = None) -> dict[str, Any]:
    roster, identities = make_roster(clients)
    config = RoundConfig(f"bench-{seed}", roster, vector_length=params,
                         neighbors=neighbors,  # type: ignore[arg-type]
                         threshold=threshold, corrupt_fraction=corrupt_fraction,
                         dropout_rate=dropout if dropout_rate is None else dropout_rate)
    if not quiet:
        print(config.graph.describe(), file=sys.stderr)
    rng = np.random.default_rng(seed)  # test data only; nothing secret comes from it
    inputs = {s: (rng.uniform(-1.0, 1.0, params), float(rng.uniform(0.1, 1.0)))
              for s in config.sites}
    dropped = rng.choice(config.sites, size=round(dropout * clients), replace=False)
    # Dropping after sharing keys is the costly case: the server must regenerate pair masks.
    dropouts = {int(s): Stage.MASKED_INPUT for s in dropped}

    def progress(stage: str, done: int, total: int) -> None:
        if not quiet and (done == total or done % max(1, total // 10) == 0):
            print(f"\r{stage:<18} {done:>5}/{total}", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    if workers > 1:
        with RangeSplitMasker(params + 1, word_bits=config.word_bits,
                              processes=workers) as splitter:
            report = simulate_round(config, identities, inputs, dropouts=dropouts,
                                    progress=progress, splitter=splitter)
    else:
        report = simulate_round(config, identities, inputs, dropouts=dropouts, progress=progress)
    if report.abort is not None or report.result is None:
        raise SystemExit(f"round aborted: {report.abort}")
    round_s = sum(report.stage_seconds.values())

    word_bytes = config.word_bits // 8
    chunk = (params + 1) * word_bytes
    aes_s = raw_keystream_seconds(report.mask_keystream_bytes, chunk, workers)
    aes_1proc_s = aes_s if workers == 1 else raw_keystream_seconds(
        report.mask_keystream_bytes, chunk, 1)
    total = np.zeros(params)
    began = time.perf_counter()
    for update, _ in inputs.values():
        np.add(total, update, out=total)
    plain_s = time.perf_counter() - began

    survivors = report.result.survivors
    expected = sum(inputs[s][0] * inputs[s][1] for s in survivors)
    max_err = float(np.max(np.abs(report.result.weighted_sum - expected)))
    return {
        "protocol": "masking",
        "clients": clients,
        "params": params,
        "dropout": dropout,
        "neighbors": config.graph.neighbors,
        "graph": "complete" if config.complete_graph else "k-regular",
        "threshold": config.reconstruction_threshold,
        "consistency_quorum": config.consistency_quorum,
        "max_missing_per_side": config.max_missing_per_side,
        "corrupt_fraction": config.corrupt_fraction,
        "dropout_rate": config.dropout_rate,
        "failure_bound": config.failure_bound,
        "failure_bound_log2": (config.graph.failure_log2
                               if math.isfinite(config.graph.failure_log2) else None),
        # per-site cost of the checks that bind the round: the survivor-list checks
        # (attestations, windows) and the unmask request (the quorum's signatures)
        "client_stage_median_s": {stage: statistics.median(times)
                                  for stage, times in report.client_stage_seconds.items()},
        "survivors": len(survivors),
        "round_s": round_s,
        "client_mask_s": statistics.median(report.client_mask_seconds.values()),
        "server_s": report.server_seconds,
        "stage_s": report.stage_seconds,
        "mask_keystream_bytes": report.mask_keystream_bytes,
        "workers": workers,
        "aes_keystream_s": aes_s,
        "aes_keystream_1proc_s": aes_1proc_s,
        "plain_sum_s": plain_s,
        "limit_ratio": round_s / (aes_s + plain_s),
        "max_abs_error": max_err,
        "error_bound": report.result.error_bound[0],
    }
