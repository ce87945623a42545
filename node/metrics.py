"""The node's Prometheus metrics (`--metrics-port`): what the terminal view shows, for
scrapers. Its own registry, served by prometheus-client's HTTP server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from .daemon import NodeStatus

PHASES = ("starting", "downloading", "waiting", "training", "exchanging", "applying")


class NodeMetrics:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"starling_node_{name}", help_text, labels, registry=self.registry)

        self.round = gauge("round", "Round this node is in.")
        self.tokens_per_s = gauge("tokens_per_second", "Training throughput this round.")
        self.loss = gauge("loss", "Latest training loss (nats per token).")
        self.val_loss = gauge(
            "val_loss", "Validation loss of the latest applied global state (nats per token)."
        )
        self.sent = gauge("bytes_sent", "Exchange bytes sent since the node started.")
        self.received = gauge("bytes_received", "Exchange bytes received since the start.")
        self.contributed = gauge("rounds_contributed", "Rounds whose mean included this node.")
        self.diverged = gauge(
            "diverged_rounds", "Rounds sat out because training diverged (NaN, Inf, overflow)."
        )
        self.utilization = gauge("utilization", "Fraction of wall time spent computing.")
        self.phase = gauge("phase", "1 for the phase the node is in, 0 for the others.", ("phase",))
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self.server.server_address[1])

    def update(self, status: NodeStatus) -> None:
        self.round.set(status.round)
        self.tokens_per_s.set(status.tokens_per_s)
        if status.loss is not None:
            self.loss.set(status.loss)
        if status.val_loss is not None:
            self.val_loss.set(status.val_loss)
        self.sent.set(status.bytes_sent)
        self.received.set(status.bytes_received)
        self.contributed.set(status.rounds_contributed)
        self.diverged.set(status.diverged_rounds)
        if status.wall_s > 0:
            self.utilization.set(status.compute_s / status.wall_s)
        current = status.phase.split()[0] if status.phase else "starting"
        for phase in (*PHASES, "catching"):
            self.phase.labels(phase=phase).set(1.0 if current == phase else 0.0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
