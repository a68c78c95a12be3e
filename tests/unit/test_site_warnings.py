"""What the SDK warns a hospital engineer of, without failing the round."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from clients.site import (
    DIVERGED_CLIP_FACTOR,
    _warn_capped_counters,
    _warn_clipped,
    _warn_diverged,
)
from secagg.model import FlatModel


def test_an_integer_tensor_changed_beyond_the_clip_is_named_in_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A step counter (BatchNorm's num_batches_tracked) that grew by 25 in a round with
    clip_norm 1: its change is capped in the average, silently before; now a warning names
    the tensor (not its values). A change within the clip, or a float change beyond it (the
    L2 clip's business), warns of nothing."""
    model = FlatModel.from_arrays({"w": np.zeros(3, np.float32),
                                   "bn.num_batches_tracked": np.zeros((), np.int64)})
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="clients"):
        _warn_capped_counters(model, np.array([5.0, 0, 0, 1.0]), 1.0, "r-1", warned)
        assert caplog.text == ""
        _warn_capped_counters(model, np.array([0.0, 0, 0, 25.0]), 1.0, "r-1", warned)
        assert "bn.num_batches_tracked" in caplog.text and "capped" in caplog.text
        assert "25" not in caplog.text.replace("r-1", "")
        caplog.clear()
        _warn_capped_counters(model, np.array([0.0, 0, 0, 25.0]), 1.0, "r-2", warned)
    assert caplog.text == ""  # (said once: a counter does so every round)


def test_an_update_far_past_the_clip_is_told_in_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A layer trained to 1e30 (finite, diverged), or a BatchNorm running variance of raw
    inputs, went out clipped to clip_norm, scaling every change down with it, with no word.
    An update more than DIVERGED_CLIP_FACTOR times the clip is now told, once a site, naming
    the tensors most of it is in (not its norm); one at that bound is not."""
    model = FlatModel.from_arrays({"w": np.zeros(3, np.float32),
                                   "bn.running_var": np.zeros(2, np.float32),
                                   "bn.num_batches_tracked": np.zeros((), np.int64)})
    delta = np.array([1.0, 0, 0, 3e29, 4e29, 1e31])  # (a counter's change is not the norm's)
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="clients"):
        _warn_diverged(model, delta, DIVERGED_CLIP_FACTOR * 2.0, 2.0, "r-1", warned)
        assert caplog.text == ""
        _warn_diverged(model, delta, 5e29, 2.0, "r-1", warned)
        assert "r-1" in caplog.text and "running statistics" in caplog.text
        assert "['bn.running_var', 'w']" in caplog.text and "e+29" not in caplog.text
        caplog.clear()
        _warn_diverged(model, delta, 5e29, 2.0, "r-2", warned)
    assert caplog.text == ""  # (said once)


def test_an_update_scaled_down_by_more_than_half_is_told_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """With the default clip_norm of 1, ordinary training (updates of norm 2 to 6) went out
    scaled by 0.16-0.5 with no word, and the result was far from plain FedAvg. An update more
    than twice the clip is told, once a site, naming the clip and how to raise it (not the
    norm); one within twice the clip is not, and one past the diverged bound is that
    warning's."""
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="clients"):
        _warn_clipped(2.0, 1.0, "r-1", warned)
        _warn_clipped(DIVERGED_CLIP_FACTOR * 1.5, 1.0, "r-1", warned)
        assert caplog.text == ""
        _warn_clipped(3.7, 1.0, "r-1", warned)
        assert "r-1" in caplog.text and "clip-norm" in caplog.text and "3.7" not in caplog.text
        caplog.clear()
        _warn_clipped(3.7, 1.0, "r-2", warned)
    assert caplog.text == ""  # (said once)


@pytest.mark.parametrize("given", [b"fed/sites/site-1", None, 3])
def test_a_site_directory_that_is_not_a_path_is_named_as_such(given: object,
                                                              tmp_path: object) -> None:
    """Site.connect(b"..."), Site.connect(None) and Site.connect(3) raised pathlib's
    TypeError from inside; a history_dir of such a type too. Each is a ConfigurationError
    naming the argument and what it was given."""
    from clients import Site
    from secagg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=rf"site directory must be a path .*got "
                                                 rf"{type(given).__name__}"):
        Site.connect(given)  # type: ignore[arg-type]
    from clients.history import History

    if given is not None:  # (None is the site directory's history, the default)
        with pytest.raises(ConfigurationError, match=rf"history directory must be a path .*"
                                                     rf"got {type(given).__name__}"):
            History(given)  # type: ignore[arg-type]


def test_a_worker_process_importing_an_unguarded_script_is_stopped_and_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """workers=2 in a training script without `if __name__ == "__main__":`: each spawned
    worker imported the script again and ran it as another copy of the site (it spent later
    rounds in history.json and announced keys), while the parent hung in encryption until
    the round aborted. Site.connect in a starting worker is refused, before it reads a
    file, naming the guard."""
    import multiprocessing

    from clients import Site
    from secagg.errors import WorkersFailed

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(WorkersFailed, match=r"if __name__ == \"__main__\""):
        Site.connect("/nonexistent/site-dir")


def test_a_broken_encryption_pool_is_named_not_raw_multiprocessing_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool broken by a worker that died (the copy an unguarded script made of the site,
    stopped at Site.connect) raised multiprocessing's own text; now WorkersFailed (a
    ConfigurationError) naming the guard."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from secagg.ckks import CkksClient, _chunks
    from secagg.errors import WorkersFailed
    from tests.ckks_kit import CkksRound

    class Broken:
        def submit(self, *args: object) -> Future[object]:
            future: Future[object] = Future()
            future.set_exception(BrokenProcessPool("A child process terminated abruptly"))
            return future

    monkeypatch.setattr(_chunks, "shared_pool", lambda workers: Broken())
    r = CkksRound(sites=3, vector_length=20_000)
    client = CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2], workers=2)
    with pytest.raises(WorkersFailed, match=r"encryption worker processes died: .*__main__"):
        client.start()


@pytest.mark.parametrize(("options", "match"), [
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"workers": "2"}, "workers must be an integer >= 1"),
    ({"workers": True}, "workers must be an integer >= 1"),
    ({"training_dtype": "float8"}, "training_dtype must be one of"),
    ({"tensors": "np"}, "tensors must be 'auto', 'numpy' or 'torch'"),
])
def test_site_options_are_refused_before_anything_is_read(options: dict[str, object],
                                                          match: str) -> None:
    """workers=0 or "2" was taken: masking ignored it, and a CKKS site refused it only after
    spending its round, as "this site refused the aggregator's messages". A site directory
    that does not exist shows they are checked first."""
    from clients import Site
    from secagg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=match):
        Site.connect("/nonexistent/site-dir", **options)  # type: ignore[arg-type]


def test_a_pool_broken_while_its_blocks_are_handed_out_is_named_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies while the blocks are still being handed out breaks the pool at
    submit: raw BrokenProcessPool, which the SDK then told as the aggregator's doing ("this
    site refused the aggregator's messages"). WorkersFailed, as for a result."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from secagg.ckks import CkksClient, _chunks
    from secagg.errors import WorkersFailed
    from tests.ckks_kit import CkksRound

    class BreaksAtTheThird:
        calls = 0

        def submit(self, *args: object) -> Future[object]:
            self.calls += 1
            if self.calls == 3:
                raise BrokenProcessPool("A child process terminated abruptly")
            return Future()  # (never done: the site must not wait for it)

    monkeypatch.setattr(_chunks, "shared_pool", lambda workers: BreaksAtTheThird())
    r = CkksRound(sites=3, vector_length=20_000)
    client = CkksClient(r.config, 2, r.identities[2], r.public, r.inputs[2], workers=2)
    with pytest.raises(WorkersFailed, match=r"encryption worker processes died"):
        client.start()


def test_an_encryption_worker_keeps_no_secret_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded encryption (a key holder's, with its secret key) in a pool worker: the worker
    kept the secret context in its cache, and the pool outlives the round (up to four rounds'
    secret keys after their key files were gone). Only public contexts are kept."""
    import hashlib

    from secagg.ckks import KeyHolder, _chunks

    monkeypatch.setattr(_chunks, "_worker_contexts", {})
    holder = KeyHolder.generate()
    secret = holder.export_secret_context()
    rows = np.zeros((1, 8))
    assert len(_chunks.worker_encrypt(hashlib.sha256(secret).digest(), secret, True, rows)) == 1
    assert _chunks._worker_contexts == {}
    public = holder.public_context().serialize()
    _chunks.worker_encrypt(hashlib.sha256(public).digest(), public, False, rows)
    assert [seeded for _, seeded in _chunks._worker_contexts] == [False]


def test_an_encryption_worker_encrypts_under_the_context_it_is_given_not_a_kept_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker keeps the public contexts it loaded, by their digest: a new round's key (a
    new context) must not be served by the last round's, whose ciphertexts the new key's
    holder cannot decrypt (and the old key's holder could)."""
    import hashlib

    from tenseal import sealapi

    from secagg.ckks import KeyHolder, _chunks, _seal

    monkeypatch.setattr(_chunks, "_worker_contexts", {})
    rows = np.array([[0.5, -1.25, 2.0]])
    for holder in (KeyHolder.generate(), KeyHolder.generate()):
        public = holder.public_context().serialize()
        [blob] = _chunks.worker_encrypt(hashlib.sha256(public).digest(), public, False, rows)
        ct = _seal.load_ciphertext(holder.seal_context, blob, scale=holder.preset.scale)
        plain = sealapi.Plaintext()
        sealapi.Decryptor(holder.seal_context, holder.secret_key).decrypt(ct, plain)
        decoded = sealapi.CKKSEncoder(holder.seal_context).decode_double(plain)[:3]
        assert np.allclose(decoded, rows[0], atol=1e-3)


def test_an_encryption_worker_keeps_at_most_four_public_contexts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool outlives the rounds: a worker that kept every round's context (each one
    megabytes) grew for as long as the site ran."""
    from secagg.ckks import KeyHolder, _chunks

    monkeypatch.setattr(_chunks, "_worker_contexts", {})
    public = KeyHolder.generate().public_context().serialize()
    for digest in range(9):
        _chunks.worker_encrypt(bytes([digest]) * 32, public, False, np.zeros((1, 8)))
        assert len(_chunks._worker_contexts) <= 4


def test_a_broken_or_resized_encryption_pool_is_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that died breaks its pool for good: handed out again, every later encryption
    of the process failed as WorkersFailed. A broken pool, or one of another size than
    asked, is shut down and a new one started."""
    from secagg.ckks import _chunks

    class Pool:
        def __init__(self, max_workers: int, **_kwargs: object) -> None:
            self.workers, self.shut = max_workers, False
            self._broken: object = False

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            self.shut = True

    monkeypatch.setattr(_chunks, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(_chunks, "_pool", None)
    monkeypatch.setattr(_chunks, "_pool_workers", 0)
    first = _chunks.shared_pool(2)
    assert _chunks.shared_pool(2) is first and not first.shut
    first._broken = "A process in the process pool was terminated abruptly"
    second = _chunks.shared_pool(2)
    assert second is not first and first.shut and not second.shut
    third = _chunks.shared_pool(3)
    assert third is not second and second.shut and third.workers == 3


def test_encryption_workers_end_when_their_site_is_killed(tmp_path: Path) -> None:
    """A site process killed with kill -9 left its encryption pool's workers running under
    init (and multiprocessing's semaphores in /dev/shm). Each worker watches its parent and
    exits once it is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "site.py"
    script.write_text(
        "import os, time\n"
        "from secagg.ckks import _chunks\n"
        "if __name__ == '__main__':\n"
        "    pool = _chunks.shared_pool(2)\n"
        "    pids = {pool.submit(os.getpid).result() for _ in range(8)}\n"
        "    print(' '.join(map(str, sorted(pids))), flush=True)\n"
        "    time.sleep(600)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout is not None
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert workers and proc.pid not in workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    end = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < end:
        time.sleep(0.2)
    left = [p for p in workers if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "encryption workers outlived their killed site"
