"""A site process for ``secagg bench service``: joins the round, waits at a barrier, submits.

usage: python -m secagg.bench.service_site SITE_DIR GO_FILE OUT_FILE
It writes OUT_FILE.ready (as SITE_DIR/../<name>.ready) once connected with the model in hand,
waits for GO_FILE, submits a fixed update and writes to OUT_FILE the bytes it sent and the
time (time.time()) it had the round's result, the CPU seconds it spent from GO to then, and
the bytes it received.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from clients import Site

    site_dir, go, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    site = Site.connect(site_dir, tensors="numpy")
    rnd = next(site.rounds())
    rng = np.random.default_rng(site.site_id)  # bench data only
    state = {k: v + rng.normal(0, 0.001, v.shape).astype(v.dtype)
             for k, v in rnd.global_model.items()}
    before, received = site._conn.bytes_sent, site._conn.bytes_received
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.01)
    cpu = time.process_time()
    if os.environ.get("SECAGG_BENCH_PROFILE"):
        import cProfile

        profile = cProfile.Profile(time.process_time)  # CPU, not waiting
        profile.runctx("rnd.submit(state, weight=50)", globals(), locals())
        profile.dump_stats(str(out.with_suffix(".prof")))
    else:
        rnd.submit(state, weight=50)
    done_at = time.time()  # the round's result in hand (wall clock: the bench compares)
    cpu = time.process_time() - cpu
    out.write_text(f"{site._conn.bytes_sent - before} {done_at!r} {cpu!r} "
                   f"{site._conn.bytes_received - received}")
    site.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
