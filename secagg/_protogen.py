"""Generate ``secagg/v1`` from ``protos/secagg/v1`` with the pinned grpcio-tools (``./dev proto``).

One protoc run for all files (grpc_tools' protoc can abort when run twice in one process).
:func:`generate` writes into any directory, so the tests can regenerate and compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTOS / "secagg" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc over every .proto into ``out``; the generated files, relative to ``out``."""
    from grpc_tools import protoc

    files = [str(p) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p.relative_to(out) for p in (out / "secagg" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    generated = generate(ROOT)
    for path in generated:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
