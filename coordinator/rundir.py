"""A run directory: everything a coordinator needs to serve (and resume) a run.

RUN_DIR/
  run.toml                  the run config (starling.runconfig)
  data/                     the tokenizer and prepared token shards + manifest.json
  checkpoints/000000/       state.safetensors (θ, outer momentum) + checkpoint.json
  identity.key              the coordinator's Ed25519 key (mode 0600)
  tls/cert.pem, tls/key.pem self-signed ECDSA P-256 certificate (key mode 0600)
  coordinator.db            SQLite (WAL): membership, rounds, commits, leases, ...
  admin_token               the admin token (mode 0600)
  join_url                  written by `serve`
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starling.checkpoint import save_state_checkpoint, state_blob
from starling.data import PrepareConfig, prepare, read_manifest
from starling.data.shards import Manifest
from starling.diloco import GlobalState
from starling.identity import Identity, TlsCertificate, create_tls_certificate
from starling.model import build_model
from starling.runconfig import RunConfig

from .store import Checkpoint, Store

CONFIG_FILE = "run.toml"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
DB_FILE = "coordinator.db"
ADMIN_TOKEN_FILE = "admin_token"
JOIN_URL_FILE = "join_url"


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or already exists."""


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"{round_:06d}"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def init_run(
    run_dir: Path,
    config: RunConfig,
    hosts: list[str] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Creates the run directory; refuses one that already holds a run. Returns a
    summary (run id, parameters, tokens, checkpoint 0's hash and fingerprint). The
    run.toml it writes names the inner warmup (RunConfig.with_warmup_pinned)."""
    config = config.with_warmup_pinned()
    if (run_dir / DB_FILE).exists() or (run_dir / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir} already holds a run (found {CONFIG_FILE} / {DB_FILE})")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists and is not empty")
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = run_dir / ".init"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    # Build everything in .init/ and move it in at the end: a crash mid-init leaves no
    # half-made run that `serve` would take for a real one.
    manifest = prepare(
        PrepareConfig(
            source=config.data.source,
            tokenizer=config.data.tokenizer,
            seed=config.run.seed,
            val_fraction=config.data.val_fraction,
            shard_tokens=config.data.shard_tokens,
        ),
        staging / DATA_DIR,
        progress=progress,
    )
    model_cfg = config.model_config(manifest.vocab_size)
    model = build_model(model_cfg, seed=config.run.seed)
    state = GlobalState.from_model(model)
    blob = state_blob(state.params, state.momentum)
    run_id = uuid.uuid4().hex
    fingerprint = state.fingerprint()
    ckpt = save_state_checkpoint(
        staging / CHECKPOINTS_DIR / f"{0:06d}",
        blob,
        {"run_id": run_id, "round": 0, "fingerprint": fingerprint, "model": model_cfg.to_dict()},
    )
    (staging / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
    Identity.load_or_create(staging / "identity.key")
    certificate = create_tls_certificate(hosts or [])
    (staging / "tls").mkdir()
    certificate.save(staging / "tls" / "cert.pem", staging / "tls" / "key.pem")
    admin_token = secrets.token_urlsafe(32)
    _write_secret(staging / ADMIN_TOKEN_FILE, admin_token)
    store = Store(staging / DB_FILE)
    with store.transaction():
        store.set_meta("run_id", run_id)
        store.set_meta("created", repr(time.time()))
        store.set_meta("numel", str(state.params.numel()))
        store.set_meta("admin_token_sha256", hashlib.sha256(admin_token.encode()).hexdigest())
        for info in manifest.shards["train"]:
            store.add_data_shard(info.file, info.tokens, info.sha256)
        store.add_checkpoint(Checkpoint(0, ckpt["sha256"], len(blob), fingerprint, time.time()))
    store.close()
    for entry in sorted(staging.iterdir()):
        os.replace(entry, run_dir / entry.name)
    staging.rmdir()
    return {
        "run_dir": str(run_dir),
        "run_id": run_id,
        "name": config.run.name,
        "parameters": state.params.numel(),
        "train_tokens": manifest.tokens("train"),
        "data_shards": len(manifest.shards["train"]),
        "checkpoint_sha256": ckpt["sha256"],
        "fingerprint": fingerprint,
        "certificate_fingerprint": certificate.fingerprint,
    }


@dataclass
class RunDir:
    path: Path
    config: RunConfig
    manifest: Manifest
    identity: Identity
    certificate: TlsCertificate

    @classmethod
    def open(cls, path: Path) -> RunDir:
        if not (path / CONFIG_FILE).is_file() or not (path / DB_FILE).is_file():
            raise RunDirError(
                f"{path} is not a run directory (no {CONFIG_FILE} or {DB_FILE}): "
                "create one with `starling coordinator init`"
            )
        config = RunConfig.load(path / CONFIG_FILE)
        manifest = read_manifest(path / DATA_DIR)
        identity = Identity.load_or_create(path / "identity.key")
        certificate = TlsCertificate.load(path / "tls" / "cert.pem", path / "tls" / "key.pem")
        return cls(path, config, manifest, identity, certificate)

    def store(self) -> Store:
        return Store(self.path / DB_FILE)

    def public_file(self, name: str) -> Path:
        """The file behind a FetchFile path; KeyError for anything not public."""
        if name in ("tokenizer.json", "manifest.json"):
            return self.path / DATA_DIR / name
        if name.startswith("data/"):
            files = {s.file for split in self.manifest.shards.values() for s in split}
            if name[len("data/") :] in files:
                return self.path / DATA_DIR / name[len("data/") :]
        parts = name.split("/")
        if (
            len(parts) == 3
            and parts[0] == CHECKPOINTS_DIR
            and parts[1].isdigit()
            and parts[2] in ("state.safetensors", "checkpoint.json")
        ):
            return checkpoint_dir(self.path, int(parts[1])) / parts[2]
        raise KeyError(name)


# --- join tokens (admin, on the run directory) ----------------------------------------


def create_join_token(store: Store, label: str, ttl_s: float) -> tuple[str, str]:
    """(token id, token): the token is shown once; the database keeps its SHA-256."""
    token_id = secrets.token_hex(4)
    token = f"stk_{token_id}_{secrets.token_urlsafe(24)}"
    now = time.time()
    with store.transaction():
        store.add_join_token(
            token_id, hashlib.sha256(token.encode()).hexdigest(), label, now, now + ttl_s
        )
    return token_id, token


def parse_duration(text: str) -> float:
    """Seconds of "90s", "15m", "12h", "7d" (or a bare number of seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 15m, 12h or 7d") from None
    if value <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return value
