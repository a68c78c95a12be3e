"""What the SDK warns a hospital engineer of, without failing the round."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from clients.site import _warn_capped_counters
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
