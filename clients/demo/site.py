"""One hospital site of the demo, as its own process: trains on its shard, submits through the
SDK over mTLS, reports per round. ``python -m clients.demo.site SITE_DIR WORK_DIR``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from clients import Site
    from clients.demo.model import make_model
    from clients.demo.train import LocalTrainer, TrainConfig
    from clients.errors import SiteError
    from clients.site import Round

    site_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
    plan = json.loads((work / "demo.json").read_text())
    site = Site.connect(site_dir, tensors="torch")
    me = site.site_id
    with np.load(work / "data" / f"site-{me}.npz") as shard:
        x, y = shard["x"], shard["y"]
    model = make_model(plan["image_size"], plan["classes"], dp=plan["dp"], seed=plan["seed"])
    trainer = LocalTrainer(model, x, y, TrainConfig(**plan["train"]), seed=plan["seed"] + me)
    drops = {int(r): stage for r, stage in plan["drops"].get(str(me), {}).items()}
    kinds = {"advertise_keys": "ADVERTISE_KEYS", "share_keys": "SHARE_KEYS",
             "masked_input": "MASKED_INPUT", "ckks_update": "UPLOAD"}
    original = Round._submit

    def submit(self: Round, **message: object) -> None:
        stage = kinds.get(next(iter(message)), "")
        if drops.get(self.number) == stage:
            raise SiteError(f"site {me} loses its connection in round {self.number}")
        original(self, **message)

    Round._submit = submit  # type: ignore[method-assign]
    with (work / f"site-{me}.jsonl").open("a") as out:
        for rnd in site.rounds():
            began = time.perf_counter()
            state = trainer.train_round(rnd.global_model, rnd.number)
            trained = time.perf_counter() - began
            sent = site._conn.bytes_sent
            report: dict[str, object] = {"round": rnd.number, "train_s": trained,
                                         "samples": trainer.samples}
            try:
                new = rnd.submit(state, weight=trainer.samples)
                report.update(survivors=list(rnd.survivors))
                if me == plan["reporter"]:
                    np.savez(work / f"model-round-{rnd.number}.npz",
                             **{k: v.numpy() for k, v in new.items()})
            except SiteError as e:
                report.update(dropped=str(e))
            report.update(bytes_sent=site._conn.bytes_sent - sent, epsilon=trainer.epsilon())
            out.write(json.dumps(report) + "\n")
            out.flush()
    site.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
