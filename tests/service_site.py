"""A site process for the service tests: joins every round, "trains" deterministically, reports.

usage: service_site.py SITE_DIR OUT.jsonl [--drop ROUND:STAGE ...] [--die ROUND:STAGE]
                                          [--slow ROUND:STAGE ...] [--record FILE:0]
                                          [--inflate-release ROUND:VALUE]
                                          [--repeat-release-site ROUND:0]
                                          [--train-float32 0:0]
                                          [--past-the-clip ROUND:VALUE]

Training adds ``site_delta(site, round)`` to the global model (tests/service_kit.py), so the
test can compute plaintext FedAvg. ``--drop R:S`` makes the site stop answering in round R from
stage S on (it stays alive and rejoins the next round); ``--die R:S`` exits the process there;
``--slow R:S`` waits 3 s before sending its stage-S message of round R; ``--die R:TRAINING``
exits as round R is handed to the training loop.
Stages are the names of secagg's Stage/CkksStage (e.g. MASKED_INPUT, UPLOAD).
``--record FILE:0`` (for the canary tests) writes, as JSON lines to FILE, every secret this
site makes (agreement private keys, self-mask seeds, shares, a CKKS secret key and flood key)
and the start of every payload it uploads; and appends every response and download it
receives from the aggregator to FILE.received. ``--inflate-release R:V`` (a lying CKKS key
holder) replaces the first value of its released average in round R with V;
``--repeat-release-site R:0`` names one site twice in its release of round R.
``--train-float32 0:0`` trains as a float32 torch model would: float tensors are cast to
float32 before training, and the state submitted is float32. ``--past-the-clip R:V`` (a
malicious CKKS site) sends V in every learned element of round R, past the SDK's L2 clip and
past the per-element clip of the CKKS layout as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from clients import Site
from clients.errors import SiteError
from clients.site import Round
from secagg.model import FlatModel
from tests.service_kit import site_delta, site_weight

KIND_STAGE = {"advertise_keys": "ADVERTISE_KEYS", "share_keys": "SHARE_KEYS",
              "masked_input": "MASKED_INPUT", "consistency_signature": "CONSISTENCY_CHECK",
              "unmask_response": "UNMASK", "ckks_key": "KEY_ANNOUNCEMENT",
              "ckks_update": "UPLOAD", "ckks_release": "RELEASE",
              "ckks_refusal": "RELEASE"}


class Dropped(SiteError):
    pass


def _record_secrets(path: Path) -> None:
    """Wrap where this site's secrets are made and what it receives, and record them."""
    import base64

    from clients.transport import Connection
    from secagg.ckks.keys import KeyHolder
    from secagg.hazmat import shamir
    from secagg.hazmat.key_agreement import AgreementKey
    from secagg.masking import client as masking_client

    log = path.open("a")
    received = path.with_name(path.name + ".received").open("ab")

    def note(kind: str, data: bytes) -> None:
        log.write(json.dumps({"kind": kind, "b64": base64.b64encode(data).decode()}) + "\n")
        log.flush()

    generate = AgreementKey.generate.__func__  # type: ignore[attr-defined]

    def recorded_generate(cls: type) -> AgreementKey:
        key = generate(cls)
        note("agreement private key", key.export_private_bytes())
        return key

    AgreementKey.generate = classmethod(recorded_generate)  # type: ignore[method-assign,assignment]
    urandom = os.urandom

    def recorded_urandom(n: int) -> bytes:
        data = urandom(n)
        if n == masking_client.SEED_BYTES:
            note("seed", data)
        return data

    masking_client.os.urandom = recorded_urandom  # type: ignore[attr-defined]
    share_to_bytes = shamir.share_to_bytes

    def recorded_share(y: int) -> bytes:
        data = share_to_bytes(y)
        note("share", data)
        return data

    shamir.share_to_bytes = recorded_share  # type: ignore[assignment]
    holder_generate = KeyHolder.generate.__func__  # type: ignore[attr-defined]

    def recorded_holder(cls: type, *args: object, **kwargs: object) -> KeyHolder:
        from secagg.ckks import _seal

        holder = holder_generate(cls, *args, **kwargs)
        members = _seal.canonical_members(holder.secret_key)
        note("ckks secret key", members[len(members) // 2:len(members) // 2 + 32])
        note("ckks flood key", holder.flood_key())
        return holder

    KeyHolder.generate = classmethod(recorded_holder)  # type: ignore[method-assign,assignment]
    call, download, upload = Connection.call, Connection.download, Connection.upload

    def recorded_call(self: Connection, method: str, request: object, **kw: object) -> object:
        response = call(self, method, request, **kw)  # type: ignore[arg-type]
        if hasattr(response, "SerializeToString"):
            received.write(response.SerializeToString())
            received.flush()
        return response

    def recorded_download(self: Connection, blob: object, **kw: object) -> bytes:
        data = download(self, blob, **kw)  # type: ignore[arg-type]
        received.write(data)
        received.flush()
        return data

    def recorded_upload(self: Connection, data: bytes, **kw: object) -> object:
        note("uploaded payload", bytes(data[:64]))
        return upload(self, data, **kw)  # type: ignore[arg-type]

    Connection.call = recorded_call  # type: ignore[method-assign,assignment]
    Connection.download = recorded_download  # type: ignore[method-assign,assignment]
    Connection.upload = recorded_upload  # type: ignore[method-assign,assignment]


def main() -> int:
    site_dir, out = sys.argv[1], Path(sys.argv[2])
    drops: dict[int, str] = {}
    die: tuple[int, str] | None = None
    slow: set[tuple[int, str]] = set()
    inflate: dict[int, float] = {}
    repeat: set[int] = set()
    unclipped: dict[int, float] = {}
    past: dict[int, float] = {}
    progress_calls: list[str] = []
    broken_progress = False
    float32 = False
    args = sys.argv[3:]
    while args:
        flag, value = args[0], args[1]
        args = args[2:]
        r, stage = value.split(":")
        if flag == "--drop":
            drops[int(r)] = stage
        elif flag == "--die":
            die = (int(r), stage)
        elif flag == "--slow":
            slow.add((int(r), stage))
        elif flag == "--record":
            _record_secrets(Path(r))
        elif flag == "--inflate-release":  # ROUND:VALUE, a key holder lying in its release
            inflate[int(r)] = float(stage)
        elif flag == "--repeat-release-site":  # ROUND:0, the release names a site twice
            repeat.add(int(r))
        elif flag == "--unclipped":  # ROUND:VALUE, a site sending VALUE in every learned
            unclipped[int(r)] = float(stage)  # element, past the SDK's clip
        elif flag == "--past-the-clip":  # ROUND:VALUE, as --unclipped, and unclipped in
            past[int(r)] = float(stage)  # the CKKS layout too (each element past the clip)
        elif flag == "--broken-progress":  # 0:0, a progress callback that always raises
            broken_progress = True
        elif flag == "--train-float32":  # 0:0
            float32 = True
    original_submit = Round._submit

    def submit(self: Round, **message: object) -> None:
        stage = KIND_STAGE[next(iter(message))]
        if die is not None and (self.number, stage) == die:
            os._exit(0)
        if (self.number, stage) in slow:
            time.sleep(3.0)
        if drops.get(self.number) == stage:
            raise Dropped(f"dropping out of round {self.number} at {stage}")
        original_submit(self, **message)

    Round._submit = submit  # type: ignore[method-assign]
    original_release = Round._verify_and_release

    def release(self: Round, *args: Any) -> Any:
        released = original_release(self, *args)
        if self.number in repeat:
            released = dataclasses.replace(released, sites=(*released.sites,
                                                            released.sites[0]))
        if self.number not in inflate:
            return released
        average = np.array(released.average, dtype=np.float64)
        average[0] = inflate[self.number]  # finite, and beyond what its tensor can hold
        return dataclasses.replace(released, average=average)

    Round._verify_and_release = release  # type: ignore[method-assign]
    def broken(what: str, done: int, total: int) -> None:
        progress_calls.append(what)
        raise RuntimeError("the progress bar broke")

    # (tensors="auto", the default: torch tensors out where torch is installed, and the
    # average back as the state is given, numpy arrays here)
    site = Site.connect(site_dir, retry_seconds=120,
                        progress=broken if broken_progress else None)
    with out.open("a") as f:
        for rnd in site.rounds():
            if die == (rnd.number, "TRAINING"):  # killed while training: nothing sent yet
                os._exit(0)
            model = FlatModel.from_arrays({k: np.asarray(v)
                                           for k, v in rnd.global_model.items()})
            delta = site_delta(site.site_id, rnd.number, model.size)
            if rnd.number in unclipped:
                import clients.tensors

                clients.tensors.clip_l2 = lambda d, *a, **k: (d, 0.0)  # type: ignore[assignment]
                delta = np.where(model.integer_positions, delta, unclipped[rnd.number])
            if rnd.number in past:
                _skip_every_clip()
                delta = np.where(model.integer_positions, delta, past[rnd.number])
            if float32:  # what a float32 script sees of the model, and trains from
                model = FlatModel.from_arrays({
                    k: v.astype(np.float32) if v.dtype == np.float64 else v
                    for k, v in model.to_arrays().items()})
            trained = model.with_values(model.values + delta)
            state = trained.to_arrays()
            try:
                new = rnd.submit(state, weight=site_weight(site.site_id))
            except SiteError as e:
                f.write(json.dumps({"round": rnd.number, "error": type(e).__name__,
                                    "reason": str(e)}) + "\n")
                f.flush()
                continue
            f.write(json.dumps({
                "round": rnd.number, "survivors": list(rnd.survivors),
                "bytes_sent": site._conn.bytes_sent, "bytes_received": site._conn.bytes_received,
                "model": FlatModel.from_arrays(new).values.tolist(),
                "steps": int(new["steps"]), "progress_calls": len(progress_calls),
                "result_types": sorted({type(v).__module__ for v in new.values()}),
            }) + "\n")
            f.flush()
    site.close()
    return 0


def _skip_every_clip() -> None:
    """This process's SDK sends its update as it is: no L2 clip, no CKKS element clip."""
    import clients.tensors
    from secagg.ckks.round import CkksRoundConfig

    def layout(self: CkksRoundConfig, update: np.ndarray, weight: float) -> np.ndarray:
        update, weight = self.check_input(update, weight)
        out = np.zeros(self.chunk_count * self.preset_params.slots, dtype=np.float64)
        out[: self.vector_length] = update * weight
        out[self.vector_length] = weight
        return out.reshape(self.chunk_count, self.preset_params.slots)

    clients.tensors.clip_l2 = lambda d, *a, **k: (d, 0.0)  # type: ignore[assignment]
    CkksRoundConfig.layout = layout  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
