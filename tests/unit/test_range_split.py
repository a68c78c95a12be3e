"""Mask expansion split over processes gives exactly the single-process result."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from secagg.hazmat.prg import RangeSplitMasker, apply_masks
from secagg.masking import RoundConfig, Stage, make_roster, simulate_round

LENGTH = 10_007  # not a multiple of a block: the split must still land on block boundaries


@pytest.fixture(scope="module")
def splitter() -> Iterator[RangeSplitMasker]:
    with RangeSplitMasker(LENGTH, processes=2) as s:
        segment = f"/dev/shm/{s._shm.name.lstrip('/')}"  # noqa: S108 (checking it is gone)
        assert os.path.exists(segment)
        yield s
    assert not os.path.exists(segment)  # closing unlinks the shared memory


@pytest.mark.parametrize("share", [0.05, 0.35, 0.5, 0.9])
def test_uneven_split_submitted_early_equals_local_expansion(splitter: RangeSplitMasker,
                                                             share: float) -> None:
    """A site starts the helpers before quantising and keeps a smaller share itself."""
    terms = [(os.urandom(32), 1 if i % 2 else -1) for i in range(5)]
    local = np.arange(LENGTH, dtype=np.uint32)
    split = local.copy()
    apply_masks(local, terms)
    pending = splitter.submit(terms, local_share=share)
    pending.apply_to(split)
    np.testing.assert_array_equal(split, local)
    with pytest.raises(RuntimeError, match="already applied"):
        pending.apply_to(split)


def test_split_equals_local_expansion(splitter: RangeSplitMasker) -> None:
    terms = [(os.urandom(32), 1 if i % 3 else -1) for i in range(7)]
    local = np.arange(LENGTH, dtype=np.uint32)
    split = local.copy()
    generated_local = apply_masks(local, terms)
    generated_split = apply_masks(split, terms, splitter=splitter)
    np.testing.assert_array_equal(local, split)
    assert generated_local == generated_split == 7 * LENGTH * 4


def test_splitter_is_reusable_and_refuses_other_lengths(splitter: RangeSplitMasker) -> None:
    terms = [(os.urandom(32), 1), (os.urandom(32), -1)]
    a = np.zeros(LENGTH, dtype=np.uint32)
    apply_masks(a, terms, splitter=splitter)
    apply_masks(a, [(s, -sign) for s, sign in terms], splitter=splitter)
    assert not a.any()
    with pytest.raises(ValueError, match="shape"):
        splitter.apply(np.zeros(5, dtype=np.uint32), terms)


def test_round_with_a_splitter_is_exact(splitter: RangeSplitMasker) -> None:
    roster, identities = make_roster(5)
    config = RoundConfig("split", roster, vector_length=LENGTH - 1)
    rng = np.random.default_rng(0)
    inputs = {s: (rng.uniform(-1, 1, LENGTH - 1), 0.5) for s in config.sites}
    report = simulate_round(config, identities, inputs, dropouts={2: Stage.MASKED_INPUT},
                            splitter=splitter)
    assert report.result is not None
    exact = sum(inputs[s][0] * 0.5 for s in report.result.survivors)
    assert np.max(np.abs(report.result.weighted_sum - exact)) <= report.result.error_bound[0]


def test_refuses_a_split_into_one_process() -> None:
    with pytest.raises(ValueError, match="processes"):
        RangeSplitMasker(100, processes=1)


def test_the_shared_memory_holds_no_mask_once_it_is_applied(splitter: RangeSplitMasker) -> None:
    """The helpers' combined mask, with the site's masked input, is the site's input: it
    stayed in the (0600) shared memory until the masker was closed. Zeroed once added."""
    terms = [(os.urandom(32), 1), (os.urandom(32), 1)]
    splitter.apply(np.zeros(LENGTH, dtype=np.uint32), terms)
    assert not any(splitter._shm.buf)
    # also when the target is refused (the helpers had already written their ranges)
    with pytest.raises(ValueError, match="shape"):
        splitter.apply(np.zeros(LENGTH + 1, dtype=np.uint32), terms)
    assert not any(splitter._shm.buf)


def test_no_expander_keeps_a_mask_once_it_is_applied(splitter: RangeSplitMasker,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The last mask expanded stayed in the scratch of the masker's own expanders and of its
    helpers' (which live, like the masker, round after round) and in the freed scratch of
    apply_masks': a core dump or swap held it (a cryptographer's review). Zeroed once used."""
    from multiprocessing import shared_memory

    from secagg.hazmat import prg

    terms = [(os.urandom(32), 1), (os.urandom(32), -1)]
    splitter.apply(np.zeros(LENGTH, dtype=np.uint32), terms)
    assert splitter._local and all(not any(e._buf) for e in splitter._local.values())
    # a helper's expanders (its function, run here on a segment of this test's)
    shm = shared_memory.SharedMemory(create=True, size=LENGTH * 4)
    monkeypatch.setattr(prg, "_worker_state", {})
    try:
        prg._worker_attach(shm.name, 32)
        prg._worker_combined(terms, 0, LENGTH, 0)
        assert any(shm.buf)  # (the combined mask, the parent's to add and zero)
        assert all(not any(e._buf) for e in prg._worker_state["expanders"].values())
        prg._worker_state["shm"].close()
    finally:
        shm.close()
        shm.unlink()
    made: list[prg.MaskExpander] = []

    class Recorded(prg.MaskExpander):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(prg, "MaskExpander", Recorded)
    apply_masks(np.zeros(LENGTH, dtype=np.uint32), terms)
    assert len(made) == 1 and not any(made[0]._buf)


def test_a_helper_that_died_is_workers_failed_not_a_raw_broken_pool() -> None:
    """A helper killed (out of memory, kill -9) broke the pool: multiprocessing's raw
    BrokenProcessPool at the next mask, and at every one after. WorkersFailed, naming what
    to do."""
    import signal

    from secagg.errors import WorkersFailed

    terms = [(os.urandom(32), 1)]
    with RangeSplitMasker(LENGTH, processes=2) as masker:
        masker.apply(np.zeros(LENGTH, dtype=np.uint32), terms)  # (the helper is up)
        for pid in list(masker._pool._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkersFailed, match="masking helper process died"):
            for _ in range(50):  # (the pool sees its helper gone within a few tries)
                masker.apply(np.zeros(LENGTH, dtype=np.uint32), terms)
        # (and at every mask after it: the broken pool refuses the helpers' work at submit)
        for _ in range(2):
            with pytest.raises(WorkersFailed, match="masking helper process died"):
                masker.submit(terms)


def test_a_helper_that_died_is_workers_failed_when_the_target_is_refused_too() -> None:
    """The helpers' work is waited for before a target of the wrong shape is refused (they
    write into the shared memory): a helper that died there is WorkersFailed as well, not a
    raw BrokenProcessPool."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from secagg.errors import WorkersFailed
    from secagg.hazmat.prg import PendingMasks

    terms = [(os.urandom(32), 1)]
    with RangeSplitMasker(LENGTH, processes=2) as masker:
        died: Future[int] = Future()
        died.set_exception(BrokenProcessPool("a child process terminated abruptly"))
        pending = PendingMasks(masker, terms, [died], masker._bounds(None)[1])
        with pytest.raises(WorkersFailed, match="masking helper process died"):
            pending.apply_to(np.zeros(LENGTH - 1, dtype=np.uint32))
