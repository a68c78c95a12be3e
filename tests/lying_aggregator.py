"""The real aggregator, lying about round 1 once it holds that round's sum (for
tests/threat_model/test_aggregator_reruns_a_model.py).

usage: lying_aggregator.py MODE aggregator serve ...   (the secagg command line after MODE)

MODE ``abort``: round 1 is reported aborted after it was unmasked (masking) or released (CKKS);
``zero``: round 1 is published completed with its own model as its result (a zero step, which
a masking site's bound on the result takes). Either way round 2 opens from round 1's model.
``aba`` (masking): round 1 completes honestly (A -> B), and round 2 is published with A as its
result (a step as long as round 1's: within the bound), so round 3 opens from A again. Were
the sites to train from a model again, the difference of two rounds' sums over different
sites would be one site's update.
``nudge`` (masking): round 1 is published with its own model moved by 2**-40 of each float
value as its result (below float32's precision: a float32 training script trains from the same
numbers), and round 2 opens from it.
``cutoff`` (masking): site 3 is told it dropped out instead of being asked to unmask round 1
(after the survivor list every site signed named it: its input is in the sum, unmasked with
the others' shares), and round 1 is published with a made-up result (every learned value
+7), far past what clipped updates make. Round 2 opens from it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import aggregator.job as job
from secagg.cli import main

MODE = sys.argv.pop(1)
_complete = job.Job._complete
_receive = job.Job.receive


_FIRST: dict[str, Any] = {}


def _lying_receive(self: Any, site: int, round_id: str, stage: int) -> Any:
    from secagg.masking.messages import Stage

    if (MODE == "cutoff" and site == 3 and round_id.endswith("round-1")
            and stage == Stage.CONSISTENCY_CHECK.value and self.active is not None
            and self.active.outgoing.get(stage) is not None):
        raise job.ServiceError(job.FAILED_PRECONDITION,
                               f"site {site} dropped out of the round at stage {stage}")
    return _receive(self, site, round_id, stage)


def _lying_complete(self: Any, active: Any, average: np.ndarray, survivors: Any,
                    release_blob: Any, weight_sum: float) -> None:
    if MODE == "cutoff" and active.view.number == 1:
        made = np.where(active.view.model.integer_positions, average, 7.0)
        return _complete(self, active, made, survivors, None, weight_sum)
    if MODE == "aba":
        if active.view.number == 1:
            _FIRST["model"] = active.view.model
        elif active.view.number == 2:
            back = (_FIRST["model"].values - active.view.model.values)
            return _complete(self, active, back / self.config.server_learning_rate,
                             survivors, None, weight_sum)
    if active.view.number == 1 and MODE == "abort":
        return self._abort(active, "TOO_FEW_SURVIVORS", "a lie: the round was summed")
    if active.view.number == 1 and MODE == "nudge":
        model = active.view.model
        step = np.where(model.integer_positions, 0.0, model.values * 2.0**-40)
        return _complete(self, active, step / self.config.server_learning_rate, survivors,
                         None, weight_sum)
    if active.view.number == 1 and MODE == "zero":
        return _complete(self, active, np.zeros_like(average), survivors, None, weight_sum)
    return _complete(self, active, average, survivors, release_blob, weight_sum)


job.Job._complete = _lying_complete  # type: ignore[method-assign]
job.Job.receive = _lying_receive  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
