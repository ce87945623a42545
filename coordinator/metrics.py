"""The coordinator's Prometheus metrics (`GET /metrics` on the dashboard's port): the run
as a scraper sees it. Its own CollectorRegistry (never the process-global one); the
run-level figures are read from the store at scrape time through `snapshot` (which
asks the coordinator's event loop), so nothing is cached or updated behind the store's
back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

ROUND_PHASES = ("waiting", "training", "exchange", "committed")
NODE_STATES = ("active", "left", "expired", "banned")


class RunCollector(Collector):
    """Run-level gauges and counters, from one snapshot (coordinator.api.metrics)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        data = self.snapshot()
        summary = data["summary"]

        def gauge(name: str, help_text: str, value: float | None) -> Iterator[Metric]:
            if value is not None:  # unknown (no commit yet, no report): no sample at all
                yield GaugeMetricFamily(f"starling_{name}", help_text, value=value)

        def counter(name: str, help_text: str, value: float) -> Metric:
            return CounterMetricFamily(f"starling_{name}", help_text, value=value)

        model = summary["model"] or {}
        info = InfoMetricFamily("starling_run", "The run this coordinator serves.")
        info.add_metric(
            [],
            {
                "run_id": summary["run_id"],
                "name": summary["run"],
                "preset": str(model.get("preset", "")),
                "codec": str(summary["codec"] or ""),
            },
        )
        yield info
        yield from gauge("round", "The current round.", summary["round"])
        phase = GaugeMetricFamily(
            "starling_round_phase", "1 for the current round's phase.", labels=["phase"]
        )
        for name in ROUND_PHASES:
            phase.add_metric([name], 1.0 if summary["phase"] == name else 0.0)
        yield phase
        yield counter("rounds_committed", "Rounds committed.", summary["rounds_committed"])
        yield counter(
            "tokens_trained", "Tokens the nodes reported training.", summary["tokens_trained"]
        )
        yield counter("tokens_committed", "Tokens in committed means.", data["tokens_committed"])
        yield from gauge("target_tokens", "The run's target in tokens.", summary["target_tokens"])
        yield from gauge("progress_ratio", "Tokens trained over the target.", summary["progress"])
        yield from gauge(
            "tokens_per_second",
            "The run's pace: committed tokens per second over recent commits.",
            summary["tokens_per_s"],
        )
        yield from gauge("eta_seconds", "Seconds to the target at that pace.", summary["eta_s"])
        nodes = GaugeMetricFamily("starling_nodes", "Nodes by state.", labels=["state"])
        for state in NODE_STATES:
            nodes.add_metric([state], summary["nodes"].get(state, 0))
        yield nodes
        roles = GaugeMetricFamily("starling_active_nodes", "Active nodes by role.", labels=["role"])
        roles.add_metric(["owner"], summary["nodes"]["owners"])
        roles.add_metric(["client-only"], summary["nodes"]["client_only"])
        yield roles
        yield from gauge(
            "nodes_catching_up",
            "Active nodes resyncing or catching up.",
            summary["nodes"]["catching_up"],
        )
        yield counter(
            "wire_bytes_sent", "Exchange bytes the nodes reported sending.", data["bytes_sent"]
        )
        yield counter(
            "wire_bytes_received",
            "Exchange bytes the nodes reported receiving.",
            data["bytes_received"],
        )
        yield from gauge("checkpoints", "Checkpoints stored.", data["checkpoints"])
        yield from gauge(
            "checkpoint_latest_round",
            "Round of the newest checkpoint.",
            data["latest_checkpoint_round"],
        )
        yield from gauge(
            "validation_loss",
            "Validation loss after the latest reported round (nats/token).",
            summary["val_loss"],
        )
        yield from gauge(
            "train_loss",
            "Mean training loss of the latest reported round (nats/token).",
            summary["train_loss"],
        )
        yield from gauge(
            "round_duration_seconds",
            "Open to commit of the latest committed round.",
            data["last_round_duration_s"],
        )
        yield from gauge(
            "round_contributors",
            "Contributors in the latest commit.",
            data["last_round_contributors"],
        )
        yield from gauge(
            "round_excluded",
            "Contributions excluded from the latest commit.",
            data["last_round_excluded"],
        )


class CoordinatorMetrics:
    """The registry `/metrics` serves: the run collector and the HTTP server's own
    request counter."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RunCollector(snapshot))
        self.http_requests = Counter(
            "starling_http_requests",
            "Dashboard HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            registry=self.registry,
        )
