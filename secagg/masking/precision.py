"""How far a masking round's published average can be from zero and from the exact one.

The decoded sum is within ``e`` an element of the exact sum of the clipped, weighted inputs and
the decoded weight sum W' within ``e_w`` of the exact W (:meth:`Quantizer.error_bound`). Each
input's elements are within ``clip`` of zero (and its learned values within ``clip`` in L2),
so with S the exact sum, |S_i| <= clip * W and the average S'/W' is off from S/W by at most

    per element: (e + clip * e_w) / (W' - e_w)
    in L2:       (sqrt(learned) * e + clip * e_w) / (W' - e_w)

(``learned``: the values the SDK clips in L2, integer counters aside; at least 1 counted).

What a site accepts (:func:`result_bound`) must not depend on its own weight: a bound built
from it (W >= the site's weight) made each site's accept/refuse of a published result an
oracle on its weight, and an aggregator publishing steps between the limits of two weights
learnt every site's sample count in ~log2(max_samples) rounds. So the bound is public: the
average of clipped updates (at most ``clip``), the rounding error at a weight sum of 1, and a
margin of ``PRECISION_MARGIN * clip`` for rounds whose weight sum is smaller. A round whose
error bound is within that margin (the aggregator warns of every other:
:func:`error_share`) is never refused by an honest site; a lying aggregator can move the model
that margin further than an honest round could.
"""

from __future__ import annotations

import math

from secagg.hazmat.quantize import Quantizer

# the share of clip_norm a round's rounding error may reach before the aggregator warns; the
# same share is what a site's bound allows beyond the average of clipped updates
PRECISION_MARGIN = 0.01


def error_share(error: tuple[float, float], weight_sum: float, learned: int,
                clip: float) -> float:
    """The most a round's average can be off, in L2 over ``learned`` values (one: per
    element), as a share of ``clip``, for a decoded weight sum ``weight_sum`` and a sum
    decoded within ``error`` = (e, e_w). Infinite when the weight sum is within its own
    error of zero."""
    element, weight_error = error
    low = weight_sum - weight_error
    if not low > 0:
        return math.inf
    return (math.sqrt(max(learned, 1)) * element + clip * weight_error) / low / clip


def result_bound(quantizer: Quantizer, learned: int) -> tuple[float, float]:
    """How far from zero a site takes a masking round's average to be, (L2 over the learned
    values, each element): ``clip`` plus the margin plus the rounding error at a weight sum
    of one full weight (``max_weight``, 1 in a federation: ``samples / max_samples``); infinite
    for a quantiser with next to no levels per site. The same for every site of the round:
    nothing in it is a site's own."""
    clip = quantizer.clip
    error = quantizer.error_bound(quantizer.max_sites)
    def bound(values: int) -> float:
        return clip * (1 + PRECISION_MARGIN
                       + error_share(error, quantizer.max_weight, values, clip))

    return bound(learned), bound(1)
