"""Hazardous materials: the primitives beneath the protocols.

Each module does one thing and checks its inputs, but none of them is a protocol: used alone,
they are easy to use wrongly (reusing a seed, forgetting associated data, sharing a secret
with too low a threshold). Hospital engineers use :mod:`secagg.masking` or the SDK instead.
"""
