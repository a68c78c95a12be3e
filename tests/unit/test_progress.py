from __future__ import annotations

import io

from clients.progress import tqdm_progress


def test_tqdm_adapter_shows_one_bar_per_kind_of_work_and_restarts_on_a_retry() -> None:
    out = io.StringIO()
    progress = tqdm_progress(file=out, mininterval=0)
    for done in range(0, 5):
        progress("upload", done, 4)
    progress("encrypt", 1, 2)
    progress("upload", 2, 4)  # a retry starts from what the aggregator already holds
    progress("upload", 4, 4)
    text = out.getvalue()
    assert "upload" in text and "encrypt" in text and "4/4" in text
