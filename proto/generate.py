"""Regenerates the committed Python stubs of proto/starling/v1/*.proto.

    python proto/generate.py            # writes src/starling/v1/*_pb2.py, .pyi, *_pb2_grpc.py

The proto package is `starling.v1`, so protoc's imports (`from starling.v1 import ...`)
resolve to `src/starling/v1/` inside our own package. tests/test_proto.py regenerates
into a temporary folder and fails when the committed stubs differ (stale). The generator
is pinned (grpcio-tools in the `dev` extra) because its version is written into the stubs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
STUBS_DIR = REPO_ROOT / "src" / "starling" / "v1"
INIT_TEXT = '"""Generated gRPC stubs of proto/starling/v1 (python proto/generate.py)."""\n'


def generate(out_root: Path) -> Path:
    """Runs protoc into out_root (a folder that then holds starling/v1/...); returns the
    folder of the generated files."""
    from grpc_tools import protoc  # the generator is a dev dependency, not a runtime one

    include = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("starling/v1/*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    out = out_root / "starling" / "v1"
    (out / "__init__.py").write_text(INIT_TEXT)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if STUBS_DIR.exists():
            shutil.rmtree(STUBS_DIR)
        shutil.copytree(fresh, STUBS_DIR)
    for path in sorted(STUBS_DIR.iterdir()):
        print(path.relative_to(REPO_ROOT))


if __name__ == "__main__":
    sys.exit(main())
