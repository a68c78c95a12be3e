"""Generated protobuf and gRPC code for ``protos/secagg/v1`` (do not edit: run ``./dev proto``).

The test suite regenerates these modules and fails if they differ from ``protos/``.
"""
