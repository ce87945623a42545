"""The coordinator's durable state: one SQLite database in WAL mode.

Every state change is one transaction, so a kill -9 at any instant leaves either the
state before it or the state after it. Rows hold plain values and JSON text (never
pickle). One connection, used from the coordinator's event-loop thread only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# Columns added after databases of schema 1 were in use: (table, column, declaration).
# Opening an older database adds them (ALTER TABLE ... ADD COLUMN keeps every row).
ADDED_COLUMNS = (
    ("nodes", "state_reason", "TEXT NOT NULL DEFAULT ''"),
    ("progress", "train_loss", "REAL NOT NULL DEFAULT 0"),
    ("progress", "round_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("shard_reports", "excluded", "TEXT NOT NULL DEFAULT '{}'"),
    ("nodes", "offences", "INTEGER NOT NULL DEFAULT 0"),
    ("shard_reports", "gram", "TEXT NOT NULL DEFAULT '[]'"),
    ("verifier_reports", "gram", "TEXT NOT NULL DEFAULT '[]'"),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    address TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    reachable INTEGER NOT NULL,
    device TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    upload_mbps REAL NOT NULL,
    download_mbps REAL NOT NULL,
    software TEXT NOT NULL,
    joined REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL,            -- active | left | expired | banned
    state_reason TEXT NOT NULL DEFAULT '',  -- why an admin banned it
    phase TEXT NOT NULL DEFAULT '',
    state_round INTEGER NOT NULL DEFAULT 0,
    resync INTEGER NOT NULL DEFAULT 0,
    rounds_contributed INTEGER NOT NULL DEFAULT 0,
    tokens_trained INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS data_shards (
    file TEXT PRIMARY KEY,
    tokens INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    tokens_trained INTEGER NOT NULL DEFAULT 0
);
-- A shard goes to one node while there are free shards; when there are more nodes than
-- shards, the least-shared one is shared (each node samples its own windows).
CREATE TABLE IF NOT EXISTS data_leases (
    file TEXT NOT NULL,
    node_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (file, node_id)
);
CREATE INDEX IF NOT EXISTS data_leases_by_node ON data_leases (node_id);
CREATE INDEX IF NOT EXISTS nodes_by_expiry ON nodes (state, expires);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    phase TEXT NOT NULL,             -- training | exchange | committed
    version INTEGER NOT NULL,
    opened REAL NOT NULL,
    deadline REAL NOT NULL,
    budget INTEGER NOT NULL,
    plan TEXT,                       -- JSON, set at close
    commit_record TEXT               -- JSON, set at commit
);
CREATE TABLE IF NOT EXISTS round_tokens (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    done INTEGER NOT NULL,
    PRIMARY KEY (round, node_id)
);
CREATE TABLE IF NOT EXISTS shard_reports (
    round INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    owner TEXT NOT NULL,
    held TEXT NOT NULL,              -- JSON [{node_id, tokens, payload_hash}]
    PRIMARY KEY (round, shard)
);
-- A shard's second owner's report, like shard_reports (RoundSpec.verifiers).
CREATE TABLE IF NOT EXISTS verifier_reports (
    round INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    owner TEXT NOT NULL,             -- the verifier
    held TEXT NOT NULL,
    excluded TEXT NOT NULL DEFAULT '{}',
    gram TEXT NOT NULL DEFAULT '[]',  -- JSON: the Gram matrix, row-major over held
    PRIMARY KEY (round, shard)
);
-- The mean each of a shard's two owners committed: its signed MeanHeader (protobuf).
CREATE TABLE IF NOT EXISTS mean_reports (
    round INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    header BLOB NOT NULL,
    PRIMARY KEY (round, shard, node_id)
);
CREATE TABLE IF NOT EXISTS exchange_reports (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    exchange_s REAL NOT NULL,
    failed_owners TEXT NOT NULL,     -- JSON list
    PRIMARY KEY (round, node_id)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (round, node_id)
);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    time REAL NOT NULL,
    round INTEGER NOT NULL,
    loss REAL NOT NULL,
    tokens_per_s REAL NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    utilization REAL NOT NULL,
    train_loss REAL NOT NULL DEFAULT 0,      -- mean over the node's inner steps; 0: unknown
    round_tokens INTEGER NOT NULL DEFAULT 0  -- tokens the node trained in the round
);
CREATE INDEX IF NOT EXISTS progress_by_time ON progress (time);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Node:
    node_id: str
    public_key: bytes
    address: str
    cert_fingerprint: str
    reachable: bool
    device: str
    memory_bytes: int
    upload_mbps: float
    download_mbps: float
    software: str
    joined: float
    last_seen: float
    expires: float
    state: str
    phase: str
    state_round: int
    resync: bool
    rounds_contributed: int
    tokens_trained: int
    state_reason: str = ""  # why it was banned (by the admin, or for rejected contributions)
    offences: int = 0  # rounds in which its contribution was rejected as poisoned


@dataclass(frozen=True)
class Round:
    round: int
    phase: str
    version: int
    opened: float
    deadline: float
    budget: int
    plan: dict[str, Any] | None
    commit: dict[str, Any] | None


@dataclass(frozen=True)
class Checkpoint:
    round: int
    sha256: str
    size: int
    fingerprint: str
    created: float


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE).
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process crash (kill -9); only a power loss
        # can take the last transactions, never corrupt the database.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript("BEGIN;" + SCHEMA + "COMMIT;")
        self._add_missing_columns()
        # After the columns: the index of the latest progress report of each node.
        self.db.execute("CREATE INDEX IF NOT EXISTS progress_by_node ON progress (node_id, id)")
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema version {version}, this coordinator reads 1")

    def _add_missing_columns(self) -> None:
        with self.transaction():
            for table, column, declaration in ADDED_COLUMNS:
                present = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- meta ---------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- nodes --------------------------------------------------------------------

    def upsert_node(self, node: Node) -> None:
        """A join: a new node, or a known identity coming back (its counters kept)."""
        self.db.execute(
            """INSERT INTO nodes (node_id, public_key, address, cert_fingerprint, reachable,
                   device, memory_bytes, upload_mbps, download_mbps, software, joined,
                   last_seen, expires, state, phase, state_round, resync)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', '', 0, 0)
               ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,
                   cert_fingerprint = excluded.cert_fingerprint,
                   reachable = excluded.reachable, device = excluded.device,
                   memory_bytes = excluded.memory_bytes, upload_mbps = excluded.upload_mbps,
                   download_mbps = excluded.download_mbps, software = excluded.software,
                   last_seen = excluded.last_seen, expires = excluded.expires,
                   state = 'active', state_reason = ''""",
            (
                node.node_id,
                node.public_key,
                node.address,
                node.cert_fingerprint,
                int(node.reachable),
                node.device,
                node.memory_bytes,
                node.upload_mbps,
                node.download_mbps,
                node.software,
                node.joined,
                node.last_seen,
                node.expires,
            ),
        )

    def node(self, node_id: str) -> Node | None:
        row = self.db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    def nodes(self, state: str | None = None) -> list[Node]:
        if state is None:
            rows = self.db.execute("SELECT * FROM nodes ORDER BY node_id")
        else:
            rows = self.db.execute("SELECT * FROM nodes WHERE state = ? ORDER BY node_id", (state,))
        return [_node(row) for row in rows]

    def heartbeat(self, node_id: str, now: float, expires: float, phase: str, round_: int) -> None:
        self.db.execute(
            "UPDATE nodes SET last_seen = ?, expires = ?, phase = ?, state_round = ? "
            "WHERE node_id = ?",
            (now, expires, phase, round_, node_id),
        )
        self.db.execute("UPDATE data_leases SET expires = ? WHERE node_id = ?", (expires, node_id))

    def set_node_state(self, node_id: str, state: str, reason: str = "") -> None:
        self.db.execute(
            "UPDATE nodes SET state = ?, state_reason = ? WHERE node_id = ?",
            (state, reason, node_id),
        )
        if state != "active":
            self.release_leases(node_id)

    def set_resync(self, node_id: str, resync: bool) -> None:
        self.db.execute("UPDATE nodes SET resync = ? WHERE node_id = ?", (int(resync), node_id))

    def node_counts(self) -> dict[str, int]:
        """Nodes by state (active, left, expired, banned)."""
        rows = self.db.execute("SELECT state, count(*) AS n FROM nodes GROUP BY state")
        return {str(row["state"]): int(row["n"]) for row in rows}

    def expire_nodes(self, now: float) -> list[str]:
        expired = [
            str(row["node_id"])
            for row in self.db.execute(
                "SELECT node_id FROM nodes WHERE state = 'active' AND expires < ?", (now,)
            )
        ]
        for node_id in expired:
            self.set_node_state(node_id, "expired")
        return expired

    # --- join tokens ----------------------------------------------------------------

    def add_join_token(
        self, token_id: str, sha256: str, label: str, created: float, expires: float
    ) -> None:
        self.db.execute(
            "INSERT INTO join_tokens (token_id, token_sha256, label, created, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            (token_id, sha256, label, created, expires),
        )

    def join_tokens(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT token_id, label, created, expires, revoked FROM join_tokens ORDER BY created"
        )
        return [dict(row) for row in rows]

    def valid_join_token(self, sha256: str, now: float) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM join_tokens WHERE token_sha256 = ? AND revoked = 0 AND expires > ?",
            (sha256, now),
        ).fetchone()
        return row is not None

    def revoke_join_token(self, token_id: str) -> bool:
        cursor = self.db.execute(
            "UPDATE join_tokens SET revoked = 1 WHERE token_id = ?", (token_id,)
        )
        return cursor.rowcount > 0

    # --- data shards and leases -----------------------------------------------------

    def add_data_shard(self, file: str, tokens: int, sha256: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO data_shards (file, tokens, sha256) VALUES (?, ?, ?)",
            (file, tokens, sha256),
        )

    def lease_shard(
        self, node_id: str, now: float, expires: float, finished: str = ""
    ) -> sqlite3.Row | None:
        """Renews the node's live lease, else leases the shard with the fewest live
        lessees (then the least trained); None only when the run has no shards. With
        `finished` (a shard the node has trained a pass over) the node's lease is not
        renewed, and that shard is taken again only when every other is held by more."""
        if finished:
            self.db.execute("DELETE FROM data_leases WHERE node_id = ?", (node_id,))
        row = self.db.execute(
            "SELECT file FROM data_leases WHERE node_id = ? AND expires >= ? LIMIT 1",
            (node_id, now),
        ).fetchone()
        if row is None:
            row = self.db.execute(
                """SELECT s.file FROM data_shards AS s
                   LEFT JOIN data_leases AS l ON l.file = s.file AND l.expires >= ?
                   GROUP BY s.file
                   ORDER BY count(l.node_id), s.file = ?, s.tokens_trained, s.file
                   LIMIT 1""",
                (now, finished),
            ).fetchone()
        if row is None:
            return None
        self.db.execute("DELETE FROM data_leases WHERE node_id = ?", (node_id,))
        self.db.execute(
            "INSERT INTO data_leases (file, node_id, expires) VALUES (?, ?, ?)",
            (row["file"], node_id, expires),
        )
        return self.db.execute(
            "SELECT * FROM data_shards WHERE file = ?", (row["file"],)
        ).fetchone()

    def is_shard(self, file: str) -> bool:
        """Whether `file` is one of the run's training shards."""
        row = self.db.execute("SELECT 1 FROM data_shards WHERE file = ?", (file,)).fetchone()
        return row is not None

    def lease_of(self, node_id: str, file: str, now: float) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM data_leases WHERE file = ? AND node_id = ? AND expires >= ?",
            (file, node_id, now),
        ).fetchone()
        return row is not None

    def release_leases(self, node_id: str) -> None:
        self.db.execute("DELETE FROM data_leases WHERE node_id = ?", (node_id,))

    def expire_leases(self, now: float) -> int:
        return self.db.execute("DELETE FROM data_leases WHERE expires < ?", (now,)).rowcount

    def leases(self) -> dict[str, list[str]]:
        """Live leases: shard file → its lessees' node ids."""
        rows = self.db.execute("SELECT file, node_id FROM data_leases ORDER BY file, node_id")
        held: dict[str, list[str]] = {}
        for row in rows:
            held.setdefault(str(row["file"]), []).append(str(row["node_id"]))
        return held

    def add_tokens(self, node_id: str, file: str, round_: int, tokens: int, done: bool) -> int:
        """Counts tokens trained in a round; returns the round's total."""
        self.db.execute(
            "UPDATE data_shards SET tokens_trained = tokens_trained + ? WHERE file = ?",
            (tokens, file),
        )
        self.db.execute(
            "UPDATE nodes SET tokens_trained = tokens_trained + ? WHERE node_id = ?",
            (tokens, node_id),
        )
        self.db.execute(
            """INSERT INTO round_tokens (round, node_id, tokens, done) VALUES (?, ?, ?, ?)
               ON CONFLICT (round, node_id) DO UPDATE SET tokens = tokens + excluded.tokens,
                   done = max(done, excluded.done)""",
            (round_, node_id, tokens, int(done)),
        )
        return self.round_token_total(round_)

    def round_token_total(self, round_: int) -> int:
        row = self.db.execute(
            "SELECT coalesce(sum(tokens), 0) AS total FROM round_tokens WHERE round = ?",
            (round_,),
        ).fetchone()
        return int(row["total"])

    def round_tokens(self, round_: int) -> dict[str, tuple[int, bool]]:
        rows = self.db.execute(
            "SELECT node_id, tokens, done FROM round_tokens WHERE round = ? ORDER BY node_id",
            (round_,),
        )
        return {str(r["node_id"]): (int(r["tokens"]), bool(r["done"])) for r in rows}

    def tokens_trained(self) -> int:
        row = self.db.execute(
            "SELECT coalesce(sum(tokens_trained), 0) AS total FROM data_shards"
        ).fetchone()
        return int(row["total"])

    # --- rounds ---------------------------------------------------------------------

    def put_round(self, round_: Round) -> None:
        self.db.execute(
            """INSERT OR REPLACE INTO rounds
                   (round, phase, version, opened, deadline, budget, plan, commit_record)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                round_.round,
                round_.phase,
                round_.version,
                round_.opened,
                round_.deadline,
                round_.budget,
                None if round_.plan is None else json.dumps(round_.plan),
                None if round_.commit is None else json.dumps(round_.commit),
            ),
        )

    def round(self, round_: int) -> Round | None:
        row = self.db.execute("SELECT * FROM rounds WHERE round = ?", (round_,)).fetchone()
        return None if row is None else _round(row)

    def current_round(self) -> Round | None:
        row = self.db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else _round(row)

    def commits(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT commit_record FROM rounds WHERE commit_record IS NOT NULL "
            "ORDER BY round DESC LIMIT ?",
            (limit,),
        )
        return [json.loads(row["commit_record"]) for row in rows]

    def committed_rounds(self, limit: int) -> list[Round]:
        """The newest `limit` committed rounds, newest first."""
        rows = self.db.execute(
            "SELECT * FROM rounds WHERE commit_record IS NOT NULL ORDER BY round DESC LIMIT ?",
            (limit,),
        )
        return [_round(row) for row in rows]

    def commit_history(self, after_round: int = -1) -> list[dict[str, Any]]:
        """One row per committed round after `after_round`, oldest first: its tokens, the
        run's committed tokens up to and including it (`tokens_total`), wire bytes,
        duration, commit time and contributor count (read inside SQLite: no JSON parsing
        of every commit record on each dashboard poll)."""
        rows = self.db.execute(
            """SELECT * FROM (
                   SELECT round,
                          json_extract(commit_record, '$.tokens') AS tokens,
                          sum(json_extract(commit_record, '$.tokens'))
                              OVER (ORDER BY round) AS tokens_total,
                          json_extract(commit_record, '$.bytes') AS bytes,
                          json_extract(commit_record, '$.duration_s') AS duration_s,
                          json_extract(commit_record, '$.committed') AS committed,
                          (SELECT count(*) FROM json_each(commit_record, '$.contributors'))
                              AS contributors
                   FROM rounds WHERE commit_record IS NOT NULL)
               WHERE round > ? ORDER BY round""",
            (after_round,),
        )
        return [dict(row) for row in rows]

    def committed_count(self) -> int:
        row = self.db.execute(
            "SELECT count(*) AS n FROM rounds WHERE commit_record IS NOT NULL"
        ).fetchone()
        return int(row["n"])

    def last_committed_round(self) -> int:
        """The newest committed round; -1 before the first commit."""
        row = self.db.execute(
            "SELECT coalesce(max(round), -1) AS r FROM rounds WHERE commit_record IS NOT NULL"
        ).fetchone()
        return int(row["r"])

    def put_shard_report(
        self,
        round_: int,
        shard: int,
        owner: str,
        held: list[dict],
        excluded: dict[str, str] | None = None,
        verifier: bool = False,
        gram: list[float] | None = None,
    ) -> None:
        """`held`: [{node_id, tokens, payload_hash}]; `excluded`: node id → the owner's
        reason; `gram`: the Gram matrix of the held ones, row-major (or empty).
        `verifier`: the report of the shard's second owner."""
        self.db.execute(
            f"INSERT OR REPLACE INTO {_reports(verifier)} "
            "(round, shard, owner, held, excluded, gram) VALUES (?, ?, ?, ?, ?, ?)",
            (
                round_,
                shard,
                owner,
                json.dumps(held),
                json.dumps(excluded or {}),
                json.dumps(gram or []),
            ),
        )

    def shard_grams(self, round_: int, verifier: bool = False) -> dict[int, list[float]]:
        """Shard → the Gram matrix its owner (or verifier) reported, row-major."""
        rows = self.db.execute(
            f"SELECT shard, gram FROM {_reports(verifier)} WHERE round = ?", (round_,)
        )
        return {int(r["shard"]): json.loads(r["gram"]) for r in rows}

    def delete_shard_report(self, round_: int, shard: int, verifier: bool = False) -> None:
        """Voids an owner's report (an audit found it false): the shard is reassigned."""
        self.db.execute(
            f"DELETE FROM {_reports(verifier)} WHERE round = ? AND shard = ?", (round_, shard)
        )

    def shard_exclusions(self, round_: int, verifier: bool = False) -> dict[int, dict[str, str]]:
        """Shard → node id → why its owner (or verifier) excluded that participant."""
        rows = self.db.execute(
            f"SELECT shard, excluded FROM {_reports(verifier)} WHERE round = ?", (round_,)
        )
        return {int(r["shard"]): json.loads(r["excluded"]) for r in rows}

    def put_mean_report(self, round_: int, shard: int, node_id: str, header: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO mean_reports VALUES (?, ?, ?, ?)",
            (round_, shard, node_id, header),
        )

    def mean_reports(self, round_: int, shard: int) -> dict[str, bytes]:
        """Node id → the serialized MeanHeader it reported for the shard."""
        rows = self.db.execute(
            "SELECT node_id, header FROM mean_reports WHERE round = ? AND shard = ?",
            (round_, shard),
        )
        return {str(r["node_id"]): bytes(r["header"]) for r in rows}

    def add_offence(self, node_id: str) -> int:
        """Counts one round in which the node's contribution was rejected; returns its
        count so far."""
        self.db.execute("UPDATE nodes SET offences = offences + 1 WHERE node_id = ?", (node_id,))
        row = self.db.execute("SELECT offences FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return int(row["offences"]) if row is not None else 0

    def shard_reports(
        self, round_: int, verifier: bool = False
    ) -> dict[int, tuple[str, list[dict[str, Any]]]]:
        rows = self.db.execute(
            f"SELECT shard, owner, held FROM {_reports(verifier)} WHERE round = ?", (round_,)
        )
        return {int(r["shard"]): (str(r["owner"]), json.loads(r["held"])) for r in rows}

    def put_exchange_report(
        self, round_: int, node_id: str, sent: int, received: int, seconds: float, failed: list
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO exchange_reports VALUES (?, ?, ?, ?, ?, ?)",
            (round_, node_id, sent, received, seconds, json.dumps(sorted(failed))),
        )

    def exchange_reports(self, round_: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM exchange_reports WHERE round = ?", (round_,)))

    def exchange_totals_by_node(self) -> dict[str, tuple[int, int]]:
        """Node id → (bytes sent, bytes received) over every round it reported."""
        rows = self.db.execute(
            "SELECT node_id, sum(bytes_sent) AS sent, sum(bytes_received) AS received "
            "FROM exchange_reports GROUP BY node_id"
        )
        return {str(r["node_id"]): (int(r["sent"]), int(r["received"])) for r in rows}

    def credit_contributors(self, node_ids: list[str]) -> None:
        self.db.executemany(
            "UPDATE nodes SET rounds_contributed = rounds_contributed + 1 WHERE node_id = ?",
            [(n,) for n in node_ids],
        )

    def put_fingerprint(self, round_: int, node_id: str, fingerprint: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?)", (round_, node_id, fingerprint)
        )

    def fingerprints(self, round_: int) -> dict[str, str]:
        rows = self.db.execute(
            "SELECT node_id, fingerprint FROM fingerprints WHERE round = ?", (round_,)
        )
        return {str(r["node_id"]): str(r["fingerprint"]) for r in rows}

    # --- progress -------------------------------------------------------------------

    def add_progress(self, node_id: str, now: float, values: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO progress (node_id, time, round, loss, tokens_per_s, bytes_sent, "
            "bytes_received, utilization, train_loss, round_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                node_id,
                now,
                values["round"],
                values["loss"],
                values["tokens_per_s"],
                values["bytes_sent"],
                values["bytes_received"],
                values["utilization"],
                values.get("train_loss", 0.0),
                values.get("round_tokens", 0),
            ),
        )

    def progress(self, since: float = 0.0, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM progress WHERE time >= ? ORDER BY id DESC LIMIT ?", (since, limit)
        )
        return [dict(row) for row in rows][::-1]

    def latest_progress(self) -> dict[str, dict[str, Any]]:
        """Node id → its latest progress report."""
        rows = self.db.execute(
            """SELECT p.* FROM progress AS p
               JOIN (SELECT node_id, max(id) AS id FROM progress GROUP BY node_id) AS latest
               ON p.id = latest.id"""
        )
        return {str(row["node_id"]): dict(row) for row in rows}

    def progress_by_round(self, after_round: int = -1) -> dict[int, dict[str, Any]]:
        """Round → the nodes' reports for it, combined: validation loss (their mean: every
        node evaluates the same global state), training loss (weighted by the tokens each
        node trained; reports without tokens, from older nodes, do not count), summed
        tokens/s, mean utilization, and how many nodes reported."""
        rows = self.db.execute(
            """SELECT round,
                      avg(loss) AS val_loss,
                      sum(train_loss * round_tokens) / nullif(sum(round_tokens), 0)
                          AS train_loss,
                      sum(tokens_per_s) AS tokens_per_s,
                      avg(utilization) AS utilization,
                      count(DISTINCT node_id) AS reports
               FROM progress WHERE round > ? GROUP BY round ORDER BY round""",
            (after_round,),
        )
        return {int(row["round"]): dict(row) for row in rows}

    # --- checkpoints ----------------------------------------------------------------

    def add_checkpoint(self, ckpt: Checkpoint) -> None:
        self.db.execute(
            "INSERT INTO checkpoints (round, sha256, size, fingerprint, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (ckpt.round, ckpt.sha256, ckpt.size, ckpt.fingerprint, ckpt.created),
        )

    def remove_checkpoint(self, round_: int) -> None:
        self.db.execute("DELETE FROM checkpoints WHERE round = ?", (round_,))

    def checkpoints(self) -> list[Checkpoint]:
        rows = self.db.execute("SELECT * FROM checkpoints ORDER BY round")
        return [Checkpoint(**dict(row)) for row in rows]


def _node(row: sqlite3.Row) -> Node:
    values = dict(row)
    values["reachable"] = bool(values["reachable"])
    values["resync"] = bool(values["resync"])
    values["public_key"] = bytes(values["public_key"])
    return Node(**values)


def _round(row: sqlite3.Row) -> Round:
    return Round(
        round=int(row["round"]),
        phase=str(row["phase"]),
        version=int(row["version"]),
        opened=float(row["opened"]),
        deadline=float(row["deadline"]),
        budget=int(row["budget"]),
        plan=None if row["plan"] is None else json.loads(row["plan"]),
        commit=None if row["commit_record"] is None else json.loads(row["commit_record"]),
    )


def _reports(verifier: bool) -> str:
    """The table of a shard's owner's reports, or of its verifier's."""
    return "verifier_reports" if verifier else "shard_reports"
