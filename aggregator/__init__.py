"""The untrusted aggregator service (gRPC, round store, limits, metrics).

It drives :class:`secagg.masking.MaskingServer` and the CKKS accumulator; it never holds a
secret key and never sees a single site's plaintext. The service itself lands in a later issue.
"""
