"""Many sites in one process for the load tests: one thread per site, each the real SDK.

usage: load_sites.py SITES_DIR FIRST LAST OUT.jsonl

Sites FIRST..LAST of the federation whose site directories are in SITES_DIR join every round,
"train" deterministically (tests/service_kit.py's site_delta), and report per round.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients import Site
from clients.errors import SiteError
from secagg.model import FlatModel
from tests.service_kit import site_delta, site_weight

lock = threading.Lock()


def run_site(site_dir: Path, out: Path) -> None:
    site = Site.connect(site_dir, tensors="numpy", retry_seconds=300)
    try:
        for rnd in site.rounds():
            model = FlatModel.from_arrays(rnd.global_model)
            state = model.with_values(model.values + site_delta(site.site_id, rnd.number,
                                                                model.size)).to_arrays()
            try:
                new = rnd.submit(state, weight=site_weight(site.site_id))
                report = {"site": site.site_id, "round": rnd.number,
                          "survivors": list(rnd.survivors),
                          "head": FlatModel.from_arrays(new).values[:16].tolist()}
            except SiteError as e:
                report = {"site": site.site_id, "round": rnd.number, "error": type(e).__name__}
            with lock, out.open("a") as f:
                f.write(json.dumps(report) + "\n")
    finally:
        site.close()


def main() -> int:
    sites_dir, first, last, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
        Path(sys.argv[4])
    ids = range(first, last + 1)
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        futures = [pool.submit(run_site, sites_dir / f"site-{s}", out) for s in ids]
        for f in futures:
            f.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
