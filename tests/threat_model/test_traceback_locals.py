"""Adversary: whoever reads a site's crash report (an error tracker that records locals,
Sentry's default; a CI log of ``pytest -l``; rich's or IPython's verbose tracebacks).

A site interrupted mid-round (Ctrl-C, a SIGTERM handler's ``sys.exit``, a MemoryError, an
exception from its own input provider) raised through frames that held its mask seeds, the
Shamir shares other sites had sealed to it (their secrets, outside the site's to give), its
quantised update, or, at a CKKS key holder, the decrypted sum before its flooding noise. A
helper's crash handler printed them all. The entry points of code that holds secrets
(``MaskingClient.handle``, ``CkksClient.start``, ``Release.finish``, the SDK's
``Round.submit``) now let an exception leave only with the locals of the frames below them
cleared (``secagg.hazmat.secret.scrub_locals``). Property, for an interruption deep inside
each: every frame of the traceback below the entry point (its causes' and contexts' too)
shows no local at all, and the secrets appear nowhere in the rendered report.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from secagg.errors import ConfigurationError
from secagg.hazmat.secret import exception_frames
from tests.roundkit import Round as MaskingRound

_OWN = (__file__, "scrubbed")  # this file's frames, and the wrapper's (it holds the call's
#                                arguments: the client, the message, the caller's state)


def _frames(exc: BaseException) -> Iterator[Any]:
    return exception_frames(exc)


def _shown_locals(exc: BaseException) -> list[tuple[str, list[str]]]:
    """(function, its local names) of every frame below the entry point that still has any."""
    return [(f.f_code.co_name, sorted(f.f_locals)) for f in _frames(exc)
            if f.f_code.co_filename != __file__ and f.f_code.co_name not in _OWN
            and f.f_locals]


def _report(exc: BaseException) -> str:
    """The traceback with its frames' locals, as a crash reporter renders it (this file's
    frames left out: pytest's assertion rewriting keeps its own locals in them)."""
    exc.__traceback__ = _below_this_file(exc.__traceback__)
    return "".join(traceback.TracebackException.from_exception(
        exc, capture_locals=True).format())


def _below_this_file(tb: Any) -> Any:
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _masking_round_at_masked_input() -> MaskingRound:
    r = MaskingRound(sites=4, vector_length=64)
    r.advance()  # keys advertised
    r.advance()  # shares exchanged: the server now delivers them
    return r


def test_an_interruption_while_masking_leaves_no_seed_share_or_update_in_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import secagg.masking.client as client_module
    from secagg.hazmat import aead

    r = _masking_round_at_masked_input()
    seeds: list[bytes] = []
    shares: list[bytes] = []
    opened = aead.open_sealed

    def recording_open(*args: Any) -> bytes:
        plain = opened(*args)
        shares.append(plain)
        return plain

    def interrupted(masked: np.ndarray, terms: Any, **kwargs: Any) -> int:
        seeds.extend(seed for seed, _ in terms)
        raise KeyboardInterrupt  # Ctrl-C while the masks expand

    monkeypatch.setattr(aead, "open_sealed", recording_open)
    monkeypatch.setattr(client_module, "apply_masks", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        r.clients[1].handle(r.outgoing[1])
    assert seeds and shares
    assert _shown_locals(caught.value) == []
    report = _report(caught.value)
    for secret in seeds + shares:
        assert repr(secret)[2:26] not in report


def test_an_input_provider_that_raises_leaves_no_seed_in_the_traceback() -> None:
    """The site's own provider (a callable: it trains while keys are exchanged) raises: the
    error is the site's, re-raised as it is, and it passed through the frame that held the
    seeds (a helper found them in its traceback, reached through the re-raise)."""
    r = _masking_round_at_masked_input()

    def provider() -> tuple[np.ndarray, float]:
        raise ValueError("training diverged")

    r.clients[1]._input = provider
    with pytest.raises(ValueError, match="training diverged") as caught:
        r.clients[1].handle(r.outgoing[1])
    assert _shown_locals(caught.value) == []


def test_an_interruption_while_encrypting_leaves_no_update_in_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from secagg.ckks import _chunks
    from tests.ckks_kit import CkksRound

    r = CkksRound(sites=3, vector_length=256)
    client = r.client(2)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_chunks.ChunkEncryptor, "for_context", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        client.start()
    assert _shown_locals(caught.value) == []


def test_an_interruption_of_a_release_leaves_no_decrypted_sum_in_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from secagg.ckks.release import Release
    from tests.ckks_kit import CkksRound

    r = CkksRound(sites=3, vector_length=256)
    uploads, aggregate = r.run()
    release = Release(r.holder, r.config, site_id=1)
    for upload in uploads:
        release.add(upload)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError  # out of memory while flooding the decrypted sum

    monkeypatch.setattr(Release, "_flooded", interrupted)
    with pytest.raises(MemoryError) as caught:
        release.finish(aggregate)
    release.close()
    assert _shown_locals(caught.value) == []


def test_an_interruption_of_submit_leaves_no_update_in_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's frames held the site's clipped update (``delta``) and everything below."""
    import clients.tensors
    from tests.threat_model.test_site_sdk_lying_aggregator import _model_info, _site

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _ = _site("masking", info, payloads)
    rnd = next(site.rounds())

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(clients.tensors, "clip_l2", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        rnd.submit({"w": np.full(8, 0.123456789, np.float32)}, weight=1)
    assert _shown_locals(caught.value) == []


def test_the_entry_points_own_frame_drops_the_arguments_it_was_called_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper's frame, still running as it clears the others, is in the traceback too,
    and held submit's arguments: the trained state dict, passed as a temporary (a second-round
    helper's finding). So did ``Site.aggregate``'s frame, which was not wrapped."""
    import clients.tensors
    from tests.threat_model.test_site_sdk_lying_aggregator import _model_info, _site

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(clients.tensors, "clip_l2", interrupted)
    for call in ("submit", "aggregate"):
        info, payloads = _model_info(1, "hospitals/job-1/round-1")
        site, _ = _site("masking", info, payloads)
        with pytest.raises(KeyboardInterrupt) as caught:
            if call == "submit":
                next(site.rounds()).submit({"w": np.full(8, 0.123456789, np.float32)}, 1)
            else:
                site.aggregate({"w": np.full(8, 0.123456789, np.float32)}, 1)
        shown = [(f.f_code.co_name, sorted(set(f.f_locals) - {"fn", "handling"}))
                 for f in _frames(caught.value) if f.f_code.co_filename != __file__]
        assert [(name, kept) for name, kept in shown if kept] == [], call
        assert "0.1234567" not in _report(caught.value), call


def test_the_callers_own_frames_keep_their_locals() -> None:
    """Called from the script's own ``except`` block, submit's exception has the script's
    exception as its context: that chain is the script's, and keeps its values."""
    from tests.threat_model.test_site_sdk_lying_aggregator import _model_info, _site

    info, payloads = _model_info(1, "hospitals/job-1/round-1")
    site, _ = _site("masking", info, payloads)
    rnd = next(site.rounds())

    def evaluate() -> None:
        accuracy = 0.25  # noqa: F841 (the script's own local, for its debugging)
        raise ValueError("evaluation failed")

    try:
        evaluate()
    except ValueError:
        with pytest.raises(ConfigurationError, match="weight must be") as caught:
            rnd.submit({"w": np.zeros(8, np.float32)}, weight=0)  # (refused: weight 0)
    context = caught.value.__context__
    assert isinstance(context, ValueError)
    frames = [f for f in _frames(context) if f.f_code.co_name == "evaluate"]
    assert frames and frames[0].f_locals.get("accuracy") == 0.25


def test_a_refused_input_leaves_no_update_in_the_traceback() -> None:
    """The clients check their input when built: a refusal there passed through the checks'
    frames, which held the update."""
    from secagg.ckks import CkksClient
    from secagg.masking import MaskingClient
    from tests.ckks_kit import CkksRound

    r = MaskingRound(sites=3, vector_length=16)
    bad = np.full(16, np.nan)
    with pytest.raises(ValueError, match="NaN or infinity") as caught:
        MaskingClient(r.config, 1, r.identities[1], (bad, 1.0))
    assert _shown_locals(caught.value) == []
    c = CkksRound(sites=3, vector_length=16)
    with pytest.raises(ValueError, match="NaN or infinity") as caught:
        CkksClient(c.config, 2, c.identities[2], c.public, (bad, 1.0))
    assert _shown_locals(caught.value) == []


def test_release_workers_that_fail_to_start_leave_no_secret_context_in_the_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers, the key holder's secret context is exported for them: a failure while
    starting them passed through the frame that held it."""
    from secagg.ckks import _shards
    from secagg.ckks.release import Release
    from tests.ckks_kit import CkksRound

    r = CkksRound(sites=3, vector_length=20000)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError("cannot start a worker")

    monkeypatch.setattr(_shards, "_Worker", failing)
    with pytest.raises(OSError) as caught:
        Release(r.holder, r.config, site_id=1, workers=2)
    assert _shown_locals(caught.value) == []
