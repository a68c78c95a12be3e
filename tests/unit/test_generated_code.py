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
