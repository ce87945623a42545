"""The wire contracts: committed stubs match the .proto files, and every part of the
contract is documented."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto" / "starling" / "v1"
STUBS_DIR = REPO / "src" / "starling" / "v1"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path) -> None:
    fresh = _generator().generate(tmp_path)
    fresh_files = {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in STUBS_DIR.iterdir() if p.is_file()}
    assert sorted(fresh_files) == sorted(committed), "run: python proto/generate.py"
    for name, content in fresh_files.items():
        assert committed[name] == content, f"{name} is stale: run python proto/generate.py"
    assert any(name.endswith(".pyi") for name in committed)


def test_every_message_field_rpc_and_service_is_commented() -> None:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos
    declaration = re.compile(
        r"^\s*(message|service|rpc|enum|oneof|(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;)"
    )
    for proto in protos:
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            if not declaration.match(line) or stripped.startswith("oneof"):
                continue
            previous = lines[number - 1].strip() if number else ""
            assert previous.startswith("//"), f"{proto.name}:{number + 1} lacks a comment: {line}"


def test_status_codes_used_by_the_owner_are_documented_in_the_contract() -> None:
    text = (PROTO_DIR / "peer.proto").read_text()
    owner = (REPO / "src" / "starling" / "exchange" / "owner.py").read_text()
    used = set(re.findall(r"StatusCode\.([A-Z_]+)", owner))
    assert used, "the owner service uses status codes"
    for code in used:
        assert re.search(rf"//\s+{code}\b", text), f"{code} is not documented in peer.proto"
