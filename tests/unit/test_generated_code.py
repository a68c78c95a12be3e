"""The committed gRPC/protobuf modules in secagg/v1 are exactly what protos/ compiles to.

Run ``./dev proto`` after changing a .proto file; this test fails until you do.
"""

from __future__ import annotations

from pathlib import Path

from secagg import _protogen


def test_generated_modules_match_the_protos(tmp_path: Path) -> None:
    fresh = _protogen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = sorted(p.relative_to(_protogen.ROOT)
                       for p in (_protogen.ROOT / "secagg" / "v1").glob("*_pb2*.py*"))
    assert committed == fresh, "secagg/v1 holds other files than protos/ generates"
    stale = [str(p) for p in fresh
             if (tmp_path / p).read_bytes() != (_protogen.ROOT / p).read_bytes()]
    assert not stale, f"out of date, run ./dev proto: {stale}"
    names = {p.stem.removesuffix("_pb2") for p in _protogen.proto_files()}
    assert {"masking", "ckks", "roster", "service"} <= names


def test_the_python_reason_enums_mirror_the_protos_one_to_one() -> None:
    """AbortReason and RefusalReason are the protos' enums by name and number: a number typed
    twice made one reason an alias of another (Python's Enum), and a round aborted for one
    was logged, counted and told to the sites as the other."""
    from secagg.errors import AbortReason, RefusalReason
    from secagg.v1 import ckks_pb2, masking_pb2

    for ours, wire, prefix in ((AbortReason, masking_pb2.AbortReason, "ABORT_REASON_"),
                               (RefusalReason, ckks_pb2.RefusalReason, "REFUSAL_REASON_")):
        mirrored = [(name if name.startswith(prefix) else prefix + name, value)
                    for name, value in ((m.name, m.value) for m in ours)]
        assert mirrored == list(wire.items())  # (an alias is no member of its own)
