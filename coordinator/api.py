"""The documents behind the dashboard: `/api/status`, `/api/peers`, `/api/rounds`,
`/api/loss`, `/api/checkpoints`, and the figures `/metrics` exports.

Each function reads the store, so it runs on the coordinator's event loop (the HTTP
threads ask the loop for it). They return plain JSON-ready dicts; times are unix
seconds, sizes bytes, losses nats per token, rates per second. README.md ("Dashboard,
JSON API and metrics") documents every field.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starling.coordination import THROUGHPUT_WINDOW, run_state, run_throughput, status_json

from .store import Node, Round, Store

if TYPE_CHECKING:
    from .service import Coordinator

FP32_BYTES = 4  # per parameter, the uncompressed pseudo-gradient's encoding
PEER_STATES = ("active", "left", "expired", "banned")


def status(coordinator: Coordinator) -> dict[str, Any]:
    """The run's summary: the gRPC status (what `starling status` prints) with what only
    the coordinator's database can add: loss, the pace over several commits, the ETA,
    node counts by state and the round in progress."""
    store = coordinator.store
    summary = status_json(coordinator.status(), coordinator.run_info())
    now = coordinator.clock()
    committed = store.committed_count()
    history = store.commit_history(after_round=_last_committed(coordinator) - THROUGHPUT_WINDOW)
    pace = run_throughput([(c["committed"], c["tokens"], c["duration_s"]) for c in history])
    remaining = max(0, summary["target_tokens"] - summary["tokens_trained"])
    losses = _latest_losses(coordinator)
    counts = store.node_counts()
    active = store.nodes("active")
    current = store.current_round()
    summary.update(
        {
            "created": _float_or_none(store.get_meta("created")),
            "now": now,
            "state": run_state(
                summary["phase"], len(active), summary["tokens_trained"], summary["target_tokens"]
            ),
            "tokens_per_s": pace,
            "eta_s": remaining / pace if pace else None,
            "rounds_committed": committed,
            "val_loss": losses[0],
            "train_loss": losses[1],
            "nodes": {
                "active": len(active),
                "owners": sum(n.reachable for n in active),
                "client_only": sum(not n.reachable for n in active),
                "catching_up": sum(_catching_up(n) for n in active),
                **{state: counts.get(state, 0) for state in PEER_STATES if state != "active"},
            },
            "current_round": None if current is None else _round_json(store, current),
        }
    )
    return summary


def peers(coordinator: Coordinator, state: str = "all", limit: int = 200) -> dict[str, Any]:
    """Every node (or those in `state`), active ones first, then the most recently
    seen; with each one's latest progress report and its wire bytes over all rounds."""
    store = coordinator.store
    now = coordinator.clock()
    nodes = store.nodes(None if state == "all" else state)
    nodes.sort(key=lambda n: (n.state != "active", -n.last_seen, n.node_id))
    latest = store.latest_progress()
    traffic = store.exchange_totals_by_node()
    commits = store.commits(1)
    excluded: dict[str, str] = commits[0]["excluded"] if commits else {}
    rows = []
    for node in nodes[:limit]:
        report = latest.get(node.node_id, {})
        sent, received = traffic.get(node.node_id, (0, 0))
        peer_status, detail = _peer_status(node, excluded)
        live = node.state == "active"
        rows.append(
            {
                "node_id": node.node_id,
                "device": node.device,
                "memory_bytes": node.memory_bytes,
                "software": node.software,
                "reachable": node.reachable,
                "role": "owner" if node.reachable else "client-only",
                "state": node.state,
                "status": peer_status,
                "status_detail": detail,
                "phase": node.phase if live else "",
                "state_round": node.state_round,
                "joined": node.joined,
                "last_seen": node.last_seen,
                "last_seen_s": max(0.0, now - node.last_seen),
                "rounds_contributed": node.rounds_contributed,
                "tokens_trained": node.tokens_trained,
                # The latest report's rate: stale for a departed node, so none.
                "tokens_per_s": report.get("tokens_per_s", 0.0) if live else 0.0,
                "utilization": report.get("utilization"),
                "train_loss": report.get("train_loss") or None,
                "bytes_sent": sent,
                "bytes_received": received,
                "upload_mbps": node.upload_mbps,
                "download_mbps": node.download_mbps,
            }
        )
    active = [r for r in rows if r["state"] == "active"]
    return {
        "now": now,
        "peers": rows,
        "totals": {
            "nodes": len(nodes),
            "listed": len(rows),
            "active": len(active),
            "owners": sum(r["reachable"] for r in active),
            "client_only": sum(not r["reachable"] for r in active),
            "tokens_per_s": sum(r["tokens_per_s"] for r in active),
            "tokens_trained": sum(n.tokens_trained for n in nodes),
            "rounds_contributed": sum(n.rounds_contributed for n in nodes),
            "bytes_sent": sum(s for s, _ in traffic.values()),
            "bytes_received": sum(r for _, r in traffic.values()),
        },
    }


def rounds(coordinator: Coordinator, limit: int = 20) -> dict[str, Any]:
    """The round in progress and the newest `limit` commits, newest first."""
    store = coordinator.store
    current = store.current_round()
    losses = store.progress_by_round(after_round=_last_committed(coordinator) - limit - 1)
    rows = []
    for round_ in store.committed_rounds(limit):
        commit, plan = round_.commit, round_.plan
        assert commit is not None
        reports = store.exchange_reports(round_.round)
        measured = sum(int(r["bytes_sent"]) + int(r["bytes_received"]) for r in reports)
        fp32 = 0 if plan is None else fp32_equivalent_bytes(plan, {r["node_id"] for r in reports})
        statuses = [s["status"] for s in commit["shards"]]
        rows.append(
            {
                "round": commit["round"],
                "committed": commit["committed"],
                "opened": round_.opened,
                "duration_s": commit["duration_s"],
                "tokens": commit["tokens"],
                "contributors": [
                    {"node_id": n, "tokens": t} for n, t in sorted(commit["contributors"].items())
                ],
                "excluded": [
                    {"node_id": n, "reason": why} for n, why in sorted(commit["excluded"].items())
                ],
                "bytes": measured,
                "fp32_bytes": fp32,
                "compression_ratio": fp32 / measured if measured and fp32 else None,
                "codec": None if plan is None else plan["codec"],
                "fingerprint": commit["fingerprint"] or None,
                "shards": {s: statuses.count(s) for s in ("committed", "reassigned", "skipped")},
                "shard_notes": [
                    {"shard": s["shard"], "status": s["status"], "detail": s["detail"]}
                    for s in commit["shards"]
                    if s["detail"]
                ],
                # Reducers kept from owning shards this round (see rounds.unreliable_reducers).
                "demoted": [
                    {"node_id": n, "reason": why}
                    for n, why in sorted(({} if plan is None else plan.get("demoted", {})).items())
                ],
                # Owner and verifier disagreed on a contribution: who lied, from evidence.
                "disputes": commit.get("disputes", []),
                "val_loss": losses.get(commit["round"], {}).get("val_loss"),
            }
        )
    in_progress = None
    if current is not None and current.phase != "committed":
        in_progress = {
            **_round_json(store, current),
            "participants": None if current.plan is None else len(current.plan["participants"]),
        }
    return {"now": coordinator.clock(), "current": in_progress, "rounds": rows}


def loss(coordinator: Coordinator, after_round: int = -1) -> dict[str, Any]:
    """One point per committed round after `after_round`, oldest first: where the run
    stood (committed tokens, commit time) and what the nodes reported for it."""
    store = coordinator.store
    reports = store.progress_by_round(after_round)
    points = []
    for commit in store.commit_history(after_round):
        report = reports.get(commit["round"], {})
        points.append(
            {
                "round": commit["round"],
                "tokens": commit["tokens_total"],
                "time": commit["committed"],
                "duration_s": commit["duration_s"],
                "contributors": commit["contributors"],
                "val_loss": report.get("val_loss"),
                "train_loss": report.get("train_loss"),
                "tokens_per_s": report.get("tokens_per_s"),
                "utilization": report.get("utilization"),
                "reports": report.get("reports", 0),
            }
        )
    return {"now": coordinator.clock(), "points": points}


def checkpoints(coordinator: Coordinator) -> dict[str, Any]:
    """Stored checkpoints, oldest first, with their download links (this server)."""
    return {
        "checkpoints": [
            {
                "round": c.round,
                "size": c.size,
                "sha256": c.sha256,
                "fingerprint": c.fingerprint,
                "created": c.created,
                "url": checkpoint_url(c.round, "state.safetensors"),
                "manifest_url": checkpoint_url(c.round, "checkpoint.json"),
            }
            for c in coordinator.store.checkpoints()
        ]
    }


def checkpoint_url(round_: int, name: str) -> str:
    return f"/checkpoints/{round_}/{name}"


def metrics(coordinator: Coordinator) -> dict[str, Any]:
    """The run-level figures `/metrics` exports (one snapshot per scrape)."""
    summary = status(coordinator)
    store = coordinator.store
    history = store.commit_history(after_round=_last_committed(coordinator) - 1)
    last = history[-1] if history else None
    last_commit = summary["last_commit"]
    traffic = store.exchange_totals_by_node()
    checkpoints_ = store.checkpoints()
    return {
        "summary": summary,
        "tokens_committed": 0 if last is None else last["tokens_total"],
        "last_round_duration_s": None if last is None else last["duration_s"],
        "last_round_contributors": None if last is None else last["contributors"],
        "last_round_excluded": None if last_commit is None else len(last_commit["excluded"]),
        "bytes_sent": sum(s for s, _ in traffic.values()),
        "bytes_received": sum(r for _, r in traffic.values()),
        "checkpoints": len(checkpoints_),
        "latest_checkpoint_round": checkpoints_[-1].round,
    }


def fp32_equivalent_bytes(plan: dict[str, Any], reporters: set[str]) -> int:
    """What the reporting nodes' traffic in a round would have been with fp32 payloads,
    counted the way they count their measured bytes (each at its own end): for every
    shard, each participant other than its owner sends its slice and receives the mean
    (4 bytes per parameter each way); the owner receives those slices and sends the
    mean to each of them. The round's compression ratio is this over the measured
    bytes (so protocol overhead counts against it)."""
    bounds = plan["bounds"]
    participants = [p["node_id"] for p in plan["participants"]]
    total = 0
    for shard, owner in enumerate(o["node_id"] for o in plan["owners"]):
        size = FP32_BYTES * (bounds[shard + 1] - bounds[shard])
        others = [p for p in participants if p != owner]
        total += 2 * size * sum(p in reporters for p in others)  # slice up, mean down
        if owner in reporters:
            total += 2 * size * len(others)
    return total


def _peer_status(node: Node, excluded_last_round: dict[str, str]) -> tuple[str, str]:
    """(status, why) as the peers table shows it."""
    if node.state == "banned":
        return "banned", node.state_reason
    if node.state != "active":
        return node.state, ""  # left or expired
    if node.resync:
        return "catching up", "its state disagreed with the commit: resyncing"
    if _catching_up(node):
        return "catching up", node.phase
    if node.node_id in excluded_last_round:
        return "excluded", excluded_last_round[node.node_id]
    return "active", node.phase


def _catching_up(node: Node) -> bool:
    return node.resync or node.phase.startswith(("catching", "downloading"))


def _last_committed(coordinator: Coordinator) -> int:
    return coordinator.store.last_committed_round()


def _current_round(coordinator: Coordinator) -> int:
    current = coordinator.store.current_round()
    return -1 if current is None else current.round


def _latest_losses(coordinator: Coordinator) -> tuple[float | None, float | None]:
    """(validation, training) loss of the newest round with reports of each."""
    reports = coordinator.store.progress_by_round(after_round=_current_round(coordinator) - 8)
    val = train = None
    for report in reports.values():  # oldest first: the newest wins
        val = report["val_loss"] if report["val_loss"] is not None else val
        train = report["train_loss"] if report["train_loss"] is not None else train
    return val, train


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _round_json(store: Store, round_: Round) -> dict[str, Any]:
    """A round as the API shows it: phase, times (unix s), budget, tokens so far."""
    return {
        "round": round_.round,
        "phase": round_.phase,
        "opened": round_.opened,
        "deadline": round_.deadline,
        "budget": round_.budget,
        "tokens": store.round_token_total(round_.round),
    }
