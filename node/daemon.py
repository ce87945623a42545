"""The node daemon: join a run, then loop — inner steps on leased data → Δ → encode →
exchange → outer step → fingerprint — until stopped.

State machine of one round r, from this node's side:
    state_round == r and round r is training  → train, report tokens until it closes
    round r is exchanging and we trained      → exchange_round (node/rounds.py)
    committed                                 → apply the mean (θ, momentum: fp32 CPU),
                                                report the fingerprint, maybe upload a
                                                checkpoint, serve the state to joiners
    state_round < current round               → catch up: apply the missed committed
                                                means (owners keep 8), or resync the state
                                                from a checkpoint / a peer
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from starling import __version__
from starling.checkpoint import state_blob, state_from_blob
from starling.codecs import CodecError, ErrorFeedback, make_codec
from starling.coordination import RETRY_MAX_DELAY_S, CoordinatorClient, JoinUrl
from starling.data.shards import Manifest, evaluation_batches
from starling.diloco import GlobalState, load_flat_parameters
from starling.exchange import (
    BandwidthLimits,
    ExchangeError,
    ExchangePeer,
    PeerConfig,
    PeerEndpoint,
    encode_shards,
)
from starling.exchange.transport import is_loopback
from starling.identity import Identity, TlsCertificate, create_tls_certificate
from starling.model import build_model
from starling.runconfig import RunConfig
from starling.train import InnerTrainer, TrainConfig, select_device
from starling.v1 import coordinator_pb2 as pb

from .distributed import InnerLoop, LocalInnerLoop, NodeGroup, ShardedInnerLoop
from .reporting import TokenReporter
from .rounds import RETRYABLE, ExchangeOutcome, check_means, exchange_round, spec_from_state

log = logging.getLogger("starling.node")

RECONNECT_S = 60.0  # how long the node keeps retrying an unreachable coordinator
LONG_POLL_S = 10.0
DIVERGED_WEIGHTS = "NaN or Inf in the weights"
LINGER_S = 20.0  # how long a leaving owner keeps serving its last round's means
# A resync that lands on the same round as the one before made no progress (the means
# after it are lost, and no peer or newer checkpoint has the state yet): wait before the
# next try, doubling up to this, instead of spinning.
RESYNC_BACKOFF_MAX_S = 30.0


@dataclass
class NodeOptions:
    url: str
    work_dir: Path
    device: str = "auto"
    upload_mbps: float | None = None
    download_mbps: float | None = None
    max_rounds: int | None = None  # leave after contributing to this many rounds
    token: str = ""
    peer_port: int = 0
    host: str = "0.0.0.0"  # where the peer service listens
    advertise_host: str | None = None  # what others dial (default: our address toward
    # the coordinator)
    client_only: bool = False
    compute_share: float = 1.0  # fraction of the time spent training (a shared machine)
    node_group: NodeGroup | None = None  # rank 0 of a torchrun node: FSDP across its GPUs


@dataclass
class NodeStatus:
    """What the terminal view and the metrics show (updated by the round loop)."""

    round: int = 0
    phase: str = "starting"
    step: int = 0
    steps: int = 0
    loss: float | None = None  # the latest inner step's training loss
    val_loss: float | None = None  # validation loss of the latest applied global state
    tokens_per_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds_contributed: int = 0
    peers: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    upload_mbps: float = 0.0  # the last exchange's rates (its bytes / its duration)
    download_mbps: float = 0.0
    # The batch, in this node's steps' batches, its inner AdamW's second moment assumes.
    moment_batches: float = 1.0
    # Rounds this node sat out because its training diverged (NaN or Inf in its update,
    # or an update too large for the codec): it restarted from θ with a fresh optimizer.
    diverged_rounds: int = 0
    events: list[str] = field(default_factory=list)


class NodeDaemon:
    def __init__(self, options: NodeOptions, on_update: Callable[[NodeStatus], None] | None = None):
        self.options = options
        self.on_update = on_update or (lambda status: None)
        self.status = NodeStatus()
        self.stop_event = threading.Event()
        self.url = JoinUrl.parse(options.url)  # a bad URL fails before anything is written
        work = options.work_dir
        work.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(work / "identity.key")
        self.client = CoordinatorClient(self.url, self.identity)
        self.run = self._retry(self.client.get_run)
        self.run_dir = work / "runs" / self.run.run_id
        self.config = RunConfig.from_toml(self.run.config_toml)
        self.manifest = Manifest.from_dict(json.loads(self.run.manifest_json))
        group = options.node_group
        self.device = group.device if group is not None else select_device(options.device)
        self.peer = self._start_peer()
        self.started = time.monotonic()
        self.state_round = 0  # rounds committed and applied to our global state
        self._last_resync_round = -1
        self._futile_resyncs = 0
        self._timings: dict[int, dict[str, float]] = {}
        self._rejoining = threading.Lock()
        self._evaluations = ThreadPoolExecutor(1, thread_name_prefix="evaluate")
        self._loop_thread = threading.current_thread()
        self._resync_wanted = threading.Event()
        # Set where training diverged (_diverged, maybe in the exchange worker); the round
        # loop restarts the replica from θ with a fresh optimizer before the next round.
        self._restart_wanted = threading.Event()
        self._diverged_lock = threading.Lock()
        # Held while θ changes in place (_apply's outer step) and while the training
        # thread copies it to fold a mean in (_fold): in overlap mode the exchange worker
        # may be catching up, after a resync, while the next round trains.
        self._theta_lock = threading.Lock()
        self._last_commit: tuple[int, set[str]] | None = None  # round, its contributors
        self._fingerprint_reports = 0  # fingerprints reported so far
        # (round, fingerprint) of our last report that came in before a majority agreed
        # on that round: the next report's reply says whether it was the agreed one.
        self._unconfirmed: tuple[int, str] | None = None
        self._reports_at_resync = 0  # … when this node last resynced

    # --- setup ------------------------------------------------------------------------

    def _start_peer(self) -> ExchangePeer:
        limits = BandwidthLimits(self.options.upload_mbps, self.options.download_mbps)
        advertise = self.options.advertise_host or _address_toward(self.url.host)
        tls = None
        if not is_loopback(advertise):
            cert_dir = self.options.work_dir / "tls"
            if (cert_dir / "cert.pem").exists():
                tls = TlsCertificate.load(cert_dir / "cert.pem", cert_dir / "key.pem")
            else:
                tls = create_tls_certificate([advertise])
                cert_dir.mkdir(parents=True, exist_ok=True)
                tls.save(cert_dir / "cert.pem", cert_dir / "key.pem")
        host = "127.0.0.1" if is_loopback(advertise) else self.options.host
        config = PeerConfig(
            self.run.run_id,
            host=host,
            port=self.options.peer_port,
            advertise_host=advertise,
            reachable=not self.options.client_only,
            limits=limits,
            screen=self.config.defences.screen,
            # Direction is judged over the whole update, on the coordinator, from the
            # owners' Gram matrices: not per shard.
            screen_direction=False,
            gram=self.config.defences.screen_direction,
        )
        return ExchangePeer(self.identity, config, tls)

    def _fetch(self, path: str, expected_sha256: str | None = None) -> Path:
        """A run file, cached in the work dir and checked against its hash."""
        target = self.run_dir / path
        if target.exists() and expected_sha256 is not None:
            if hashlib.sha256(target.read_bytes()).hexdigest() == expected_sha256:
                return target
        data = self._retry(lambda: self.client.fetch_file(path, target))
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise ConnectionError(f"{path} does not match the manifest's SHA-256")
        return target

    def _shard_tokens(self, file: str, sha256: str) -> np.ndarray:
        path = self._fetch("data/" + file, sha256)
        return np.memmap(path, dtype=self.manifest.dtype, mode="r")

    # --- the loop ---------------------------------------------------------------------

    def run_forever(self) -> int:
        """Joins and runs rounds until stopped (or max_rounds); leaves; returns the
        number of rounds this node contributed to."""
        self._loop_thread = threading.current_thread()
        joined = self._join()
        heartbeats = threading.Thread(
            target=self._heartbeat_loop, args=(joined.heartbeat_interval_s,), daemon=True
        )
        heartbeats.start()
        try:
            self._prepare()
            self._loop()
        except InterruptedError:
            pass  # stopped while waiting for the coordinator
        finally:
            self.stop_event.set()
            self._evaluations.shutdown(wait=True)
            self._linger()
            try:
                self.client.leave("stopped")
                self._event("left the run")
            except grpc.RpcError as err:
                log.warning("leave failed: %s", err.code())
            heartbeats.join(5)
            self.peer.close()
            self.client.close()
        return self.status.rounds_contributed

    def stop(self) -> None:
        self.stop_event.set()

    def _linger(self) -> None:
        """Before leaving: the committed means this node owns exist nowhere else, so it
        serves them until every other contributor fetched them (or LINGER_S passed). A
        node that was the round's only contributor holds the only copy of the state:
        it hands it to the coordinator as a checkpoint (nodes that were behind resume
        from there)."""
        if self._last_commit is None:
            return
        round_, contributors = self._last_commit
        others = contributors - {self.identity.node_id}
        if others:
            if not self.peer.wait_served(round_, others, LINGER_S):
                log.info("left before every contributor fetched round %d's means", round_)
            return
        if contributors and self.state_round == round_ + 1:
            self._hand_over_state()

    def _hand_over_state(self) -> None:
        try:
            latest = self.client.get_run().latest_checkpoint.round
            if latest >= self.state_round:
                return
            blob = state_blob(self.state.params, self.state.momentum)
            self.client.upload_checkpoint(self.state_round, blob, self.state.fingerprint())
            self._event(f"handed the state over as checkpoint {self.state_round}")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                log.warning("could not hand the state over: %s", err.details())

    def _join(self) -> pb.JoinResponse:
        endpoint = self.peer.endpoint
        fingerprint = "" if endpoint is None else endpoint.cert_fingerprint or ""
        capabilities = pb.Capabilities(
            device=_device_name(self.device),
            memory_bytes=_device_memory(self.device),
            software=f"starling {__version__}",
        )
        joined = self._retry(
            lambda: self.client.join(
                capabilities,
                advertise_address="" if endpoint is None else endpoint.address,
                cert_fingerprint=fingerprint,
                join_token=self.options.token,
            ),
            rejoin=False,
        )
        # Sign the current round from now on: the heartbeats start before the round loop
        # (downloads come first), and the coordinator refuses a round 8 behind.
        self.client.round = self._retry(lambda: self.client.get_round(wait_s=0.0)).round
        role = "owner" if joined.reachable else "client-only"
        self._event(
            f"joined {self.run.name} as {self.identity.node_id[:12]} "
            f"({role}: {joined.reachability_detail})"
        )
        return joined

    def _prepare(self) -> None:
        self._set(phase="downloading")
        self._fetch("tokenizer.json", self.manifest.tokenizer_sha256)
        model_cfg = self.config.model_config(self.manifest.vocab_size)
        self.train_cfg = self._train_config()
        # Read once: _settle asks every round.
        self._follows_contributors = self.config.follows_contributors()
        if self.options.node_group is not None:
            self.inner: InnerLoop = ShardedInnerLoop(
                self.options.node_group,
                model_cfg,
                self.train_cfg,
                self.config.run.seed,
                self._follows_contributors,
            )
        else:
            model = build_model(model_cfg, seed=self.config.run.seed, device=self.device)
            trainer = InnerTrainer(model, self.train_cfg, self.device, self._follows_contributors)
            self.inner = LocalInnerLoop(model, trainer, self.train_cfg)
            log.info(
                "training on %s (%s)",
                _device_name(self.device),
                f"{trainer.amp_dtype} autocast" if trainer.amp_dtype else "fp32",
            )
        val = [self._shard_tokens(s.file, s.sha256) for s in self.manifest.shards["val"]]
        self.val_batches = evaluation_batches(
            val, self.train_cfg.seq_len, self.train_cfg.micro_batch_size, 4
        )
        self.feedback = ErrorFeedback(
            make_codec(self.config.outer.codec), self.config.outer.feedback_decay
        )
        self.state, self.state_round = self._latest_state()
        self.peer.set_state(self.state_round, self.state.params, self.state.momentum)
        # The run's tokens so far: where the inner learning-rate schedule is (then every
        # applied commit adds its tokens).
        status = self._retry(self.client.get_status)
        self.run_tokens = int(status.tokens_trained)
        if self._follows_contributors:
            # As many as the latest commit had; before the first one, the active nodes
            # (min_nodes at least open a round).
            expected = len(status.last_commit.contributors) or max(
                self.config.membership.min_nodes,
                sum(peer.state == "active" for peer in status.peers),
            )
            self.status.moment_batches = self.inner.set_moment_batches(expected)
        else:
            self.status.moment_batches = self.train_cfg.moment_batches
        self.lease: pb.DataLease | None = None
        self._data_file = ""  # the shard the inner loop samples from
        self._pass_tokens = 0  # tokens trained on it since it was leased (or last renewed)
        self._eval_trainer: InnerTrainer | None = None

    def _train_config(self) -> TrainConfig:
        # Its position is the run's progress (set_schedule_step).
        return replace(self.config.inner_schedule(), device=self.options.device)

    def _latest_state(self) -> tuple[GlobalState, int]:
        info = self._retry(self.client.get_run).latest_checkpoint
        blob = self._retry(
            lambda: self.client.fetch_file(f"checkpoints/{info.round}/state.safetensors")
        )
        if hashlib.sha256(blob).hexdigest() != info.sha256:
            raise ConnectionError(f"checkpoint {info.round} does not match its SHA-256")
        state = GlobalState(*state_from_blob(blob, self.run.numel))
        if state.fingerprint() != info.fingerprint:
            raise ConnectionError(f"checkpoint {info.round} does not match its fingerprint")
        self._event(f"loaded checkpoint {info.round}")
        return state, info.round

    def _loop(self) -> None:
        if self.config.outer.overlap:
            self._loop_overlapped()
            return
        while not self.stop_event.is_set():
            if self.options.max_rounds is not None:
                if self.status.rounds_contributed >= self.options.max_rounds:
                    return
            if self._resync_wanted.is_set():
                self._event("the coordinator says our state disagrees: resync")
                self._resync(self.state_round)
            if self._restart_wanted.is_set():
                self._restart_wanted.clear()
                self.inner.restart(self.state.params)  # any means missed: caught up below
            current = self._retry(lambda: self.client.get_round(wait_s=0.0))
            if not current.phase:  # no round yet (waiting for nodes)
                self._wait_for_change(current)
                continue
            self.client.round = current.round
            if self.state_round < current.round:
                self._catch_up(current.round)
                continue
            if current.phase != "training":
                self._wait_for_change(current)
                continue
            trained = self._train(current)
            if trained is None:
                continue
            self._exchange_and_apply(current.round, *trained)

    def _loop_overlapped(self) -> None:
        """One-step-delayed outer updates: round r's exchange and outer step run in a
        worker while round r+1 trains. As soon as they are done, the replica folds the
        new global state in between two inner steps of r+1, keeping its own progress of
        r+1 on top of it (at the close of r+1 if they end later), as `starling simulate
        --overlap --overlap-steps τ` does with an exchange of τ steps. Nothing but the
        wait for the round to close sits between two rounds' inner steps."""
        anchor = self.state.params.clone()
        self.inner.load(anchor)
        pending: tuple[int, Future[Any]] | None = None
        pool = ThreadPoolExecutor(1, thread_name_prefix="exchange")

        def settle() -> None:
            nonlocal pending
            if pending is not None:
                _, future = pending
                pending = None
                future.result()

        def arrived() -> bool:
            """Round r−1's mean is in θ and round r can fold it in, nothing left to
            restart from. θ is whole once state_round passes r−1 (_apply and _take_state
            set it last); the exchange worker may still be reporting the fingerprint or
            uploading a checkpoint, which only read θ."""
            if pending is None or self._restart_wanted.is_set():
                return False
            round_, future = pending
            if future.done():
                return future.exception() is None
            return self.state_round > round_

        try:
            while not self.stop_event.is_set():
                limit = self.options.max_rounds
                if limit is not None and self.status.rounds_contributed >= limit:
                    return
                if limit is not None and pending is not None:
                    if self.status.rounds_contributed + 1 >= limit:
                        settle()  # the last round: no more training after it
                        continue
                if self._resync_wanted.is_set():
                    settle()
                    self._event("the coordinator says our state disagrees: resync")
                    self._resync(self.state_round)
                    anchor = self.state.params.clone()
                    self.inner.load(anchor)
                if self._restart_wanted.is_set():
                    # The diverged round's progress is gone, and so is the anchor built
                    # on it: settle the exchange in flight, start again from θ (and catch
                    # up, below, on the means of the rounds we sat out).
                    settle()
                    self._restart_wanted.clear()
                    anchor = self.state.params.clone()
                    self.inner.restart(anchor)
                current = self._retry(lambda: self.client.get_round(wait_s=0.0))
                if not current.phase:
                    self._wait_for_change(current)
                    continue
                self.client.round = current.round
                if pending is None and self.state_round < current.round:
                    self._catch_up(current.round)
                    anchor = self.state.params.clone()
                    self.inner.load(anchor)
                    continue
                if current.phase != "training":
                    self._wait_for_change(current)
                    continue
                trained = self._train(current, anchor, arrived)
                if trained is None:
                    # Closed before we trained: round r−1's exchange must land before the
                    # catch-up check above can see which means we lack.
                    settle()
                    continue
                delta, tokens = trained
                settle()  # round r−1's mean, exchanged and applied while this round trained
                if delta is None or self._restart_wanted.is_set():
                    # This round diverged, or round r−1 could not be sent and this one
                    # trained on top of it: withdraw from it, still reduce our shards and
                    # take its mean (now: the restart above starts from the θ after it).
                    if delta is None:
                        self._exchange_and_apply(current.round, None, tokens)
                        continue
                    because = "it trained on top of the diverged round"
                    self._event(f"round {current.round}: not contributing: {because}")
                    self._exchange_and_apply(current.round, None, tokens, because)
                    continue
                # The replica keeps this round's progress (−Δ) on top of the new θ.
                anchor = torch.sub(self.state.params, delta)
                self.inner.load(anchor)
                pending = (
                    current.round,
                    pool.submit(self._exchange_and_apply, current.round, delta, tokens),
                )
        finally:
            try:
                settle()
            finally:
                pool.shutdown(wait=True)

    def _wait_for_change(self, state: pb.RoundState) -> None:
        """Until `state` changes: the round opens (no round yet, or the last one
        committed and the next is not open: a committed round never changes again, so
        waiting on it would sit out the whole long poll), closes or commits."""
        self._set(phase="waiting")
        round_: int | None
        if state.phase == "committed":
            round_, known_version = state.round + 1, 0  # any version: it opened
        else:
            round_, known_version = (state.round if state.phase else None), state.version
        self._retry(lambda: self.client.get_round(round_, known_version=known_version, wait_s=2.0))

    # --- training ---------------------------------------------------------------------

    def _ensure_lease(self, finished: str = "") -> pb.DataLease:
        """The node's data lease (heartbeats renew it; a new one when it lapsed, or when
        the node hands back the shard it has `finished` a pass over)."""
        if self.lease is not None and not finished:
            return self.lease
        lease = self._retry(lambda: self.client.acquire_lease(finished))
        if finished:
            self._pass_tokens = 0  # count the next pass, on whichever shard it is
        if lease.file != self._data_file:  # the same shard again: keep its sampling order
            path = self._fetch("data/" + lease.file, lease.sha256)
            seed = int(self.identity.node_id[:8], 16)
            self.inner.set_data(path, self.manifest.dtype, seed)
            self._data_file = lease.file
            self._pass_tokens = 0
            self._event(f"leased data shard {lease.file}")
        self.lease = lease
        return lease

    def _train(
        self,
        state: pb.RoundState,
        anchor: torch.Tensor | None = None,
        arrived: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor | None, int] | None:
        """Inner steps until the round closes, from θ (or, in overlap mode, from where
        the replica is, measuring Δ from `anchor`); returns (Δ, weight) or None when the
        round closed before this node trained anything. In overlap mode, once
        `arrived()` says the previous round's mean is applied to θ, the replica folds it
        in between two steps: its progress since `anchor` on top of the new θ, which
        this round's Δ is then measured from. Δ is None when training
        diverged (the round is then sat out: see _diverged). The weight is the tokens the
        coordinator counted for this node, not those it trained: steps taken after the
        round closed reach no report, and a header declaring more than the count is
        rejected (coordinator.rounds.commit_record)."""
        if anchor is None:
            self.inner.load(self.state.params)
        self.inner.set_schedule_step(self.run_tokens // self.train_cfg.batch_tokens)
        budget_mode = state.budget > 0
        steps = self.config.round.inner_steps
        self._set(phase="training", round=state.round, step=0, steps=steps)
        tokens = 0
        loss_sum, steps_done = 0.0, 0
        started = time.monotonic()
        self._timings[state.round] = {"train_started": time.time(), "compute_s": 0.0}
        reporter = TokenReporter(
            lambda file, count, done: self._retry(
                functools.partial(self.client.report_tokens, state.round, file, count, done)
            )
        )
        if self.lease is not None and self._pass_tokens >= self.lease.tokens:
            # One pass over the shard: hand it back for another. Only here, between
            # rounds, so that no token report names a shard the node no longer holds.
            # A node that kept one shard for a whole run would train it tens of times,
            # leave the rest of the data unread, and pull its updates away from the
            # others' (bench/chaos.py: 26-35 passes over 8 of 62 shards in 170 rounds).
            self._ensure_lease(finished=self.lease.file)
        try:
            while not reporter.closed.is_set() and not self.stop_event.is_set():
                if reporter.lease_lost.is_set():
                    reporter.lease_lost.clear()
                    self.lease = None  # our data lease lapsed: take a new one
                lease = self._ensure_lease()
                step_started = time.monotonic()
                stats = self.inner.step()
                step_s = time.monotonic() - step_started
                self.status.compute_s += step_s
                self._timings[state.round]["compute_s"] += step_s
                if self.options.compute_share < 1:
                    # Rest in proportion to the step: a share f trains f of the time.
                    self.stop_event.wait(step_s * (1 / self.options.compute_share - 1))
                tokens += stats.tokens
                self._pass_tokens += stats.tokens
                loss_sum += stats.loss
                steps_done += 1
                if anchor is not None and arrived is not None and arrived():
                    arrived = None
                    anchor = self._fold(state.round, anchor, steps_done)
                done = not budget_mode and steps_done >= steps
                reporter.add(lease.file, stats.tokens, done)
                elapsed = time.monotonic() - started
                self._set(
                    step=steps_done,
                    loss=stats.loss,
                    tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                )
                if done:
                    self._set(phase="waiting for the round to close")
                    reporter.flush(RECONNECT_S)
                    if reporter.lease_lost.is_set():  # the `done` report was refused
                        self.lease = None
                        reporter.add(self._ensure_lease().file, 0, done=True)
                        reporter.flush(RECONNECT_S)
                    break
        finally:
            reporter.close()
        if tokens == 0 or self.stop_event.is_set():
            return None
        # At least 1 (a header's least): a report the coordinator counted but whose reply
        # was lost leaves `accepted` short, never over.
        weight = max(reporter.accepted, 1)
        self._wait_closed(state.round)
        self._timings[state.round].update(
            train_ended=time.time(), train_loss=loss_sum / steps_done, tokens=tokens
        )
        delta = (self.state.params if anchor is None else anchor) - self.inner.flat()
        if not bool(torch.isfinite(delta).all()):
            self._diverged(state.round, DIVERGED_WEIGHTS)
            return None, weight
        return delta, weight

    def _fold(self, round_: int, anchor: torch.Tensor, steps_done: int) -> torch.Tensor:
        """The previous round's mean, now in θ, folded into the replica that trained
        `steps_done` steps of round `round_` from `anchor`: it goes on from θ plus that
        progress, and θ is the anchor its Δ is measured from. The sooner the mean is
        folded in, the less it trains on a stale θ (`starling simulate --overlap-steps`)."""
        trained = self.inner.flat() - anchor
        with self._theta_lock:
            anchor = self.state.params.clone()
        self.inner.load(anchor + trained)
        self._timings[round_]["folded_at_step"] = steps_done
        return anchor

    def _diverged(self, round_: int, why: str) -> None:
        """Training diverged (an unstable lr, a faulty GPU): sit this round out (the
        exchange withdraws this node's contribution, see _exchange), and have the round
        loop restart the replica from θ with a fresh optimizer, whose moments the
        divergence poisoned too. Runs in the exchange worker too, in overlap mode."""
        with self._diverged_lock:
            self.status.diverged_rounds += 1
        self._timings.pop(round_, None)
        self._event(
            f"round {round_}: training diverged ({why}): not contributing; the replica "
            "restarts from the global state with a fresh optimizer"
        )
        self._restart_wanted.set()

    def _wait_closed(self, round_: int) -> None:
        state = self._retry(lambda: self.client.get_round(round_))
        while state.phase == "training" and not self.stop_event.is_set():
            state = self._retry(
                functools.partial(
                    self.client.get_round, round_, known_version=state.version, wait_s=5.0
                )
            )

    # --- exchange and outer step ------------------------------------------------------

    def _exchange_and_apply(
        self,
        round_: int,
        delta: torch.Tensor | None,
        tokens: int,
        withdrawn_because: str = f"training diverged ({DIVERGED_WEIGHTS})",
    ) -> None:
        exchanged = self._exchange(round_, delta, tokens, withdrawn_because)
        if exchanged is not None:
            self._settle(round_, exchanged)

    def _exchange(
        self,
        round_: int,
        delta: torch.Tensor | None,
        tokens: int,
        withdrawn_because: str,
    ) -> tuple[ExchangeOutcome, tuple[int, ...], int, float] | None:
        """This node's part of round `round_`'s exchange (no state change: safe to run
        in a worker while the next round trains). Without Δ (or with one its codec
        cannot carry) it withdraws from the round, `withdrawn_because`, and still
        reduces its shards and gathers the mean: the others need not wait for the
        exchange deadline, and the node stays current."""
        state = self._retry(lambda: self.client.get_round(round_))
        participants = {p.node_id for p in state.plan.participants}
        if state.phase != "exchange" or self.identity.node_id not in participants:
            self._event(f"round {round_}: not a participant (closed without our tokens)")
            return None
        self._set_phase("exchanging", peers=len(participants))
        spec = spec_from_state(self.run.run_id, state)
        payloads: list[bytes] | None = None
        if delta is not None:
            try:
                payloads, _ = encode_shards(spec.plan, delta, self.feedback)
            except CodecError as err:  # finite, but beyond what the codec can represent
                self._diverged(round_, str(err))
                withdrawn_because = f"training diverged ({err})"
        if payloads is None:
            tokens = 0
            self._timings.pop(round_, None)  # not a round this node trained in
            try:
                self._retry(lambda: self.client.withdraw(round_, withdrawn_because))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # No longer exchanging: committed without us already (at its deadline).
            state = self._retry(lambda: self.client.get_round(round_))
        exchange_started = time.monotonic()
        outcome = exchange_round(self.client, self.peer, state, payloads, tokens)
        return outcome, spec.plan.bounds, tokens, time.monotonic() - exchange_started

    def _settle(
        self, round_: int, exchanged: tuple[ExchangeOutcome, tuple[int, ...], int, float]
    ) -> None:
        """Applies round `round_`'s committed mean to the global state."""
        outcome, bounds, tokens, exchange_s = exchanged
        self.status.bytes_sent += outcome.bytes_sent
        self.status.bytes_received += outcome.bytes_received
        if exchange_s > 0:
            self.status.upload_mbps = outcome.bytes_sent * 8 / exchange_s / 1e6
            self.status.download_mbps = outcome.bytes_received * 8 / exchange_s / 1e6
        skipped = outcome.skipped
        if outcome.missing:
            if self._adopt_peer_state(round_ + 1):
                return
            skipped = self._lost(round_, outcome.missing, skipped)
        self._apply(round_, outcome.mean, outcome.commit, skipped, bounds)
        self._log_timing(
            round_,
            {
                "tokens": tokens,
                "exchange_s": exchange_s,
                "bytes_sent": outcome.bytes_sent,
                "bytes_received": outcome.bytes_received,
            },
        )
        contributors = {c.node_id for c in outcome.commit.contributors}
        self._last_commit = (round_, contributors)
        if contributors and self._follows_contributors:
            # The next round's mean is over about as many contributions as this one's:
            # a batch that many times ours (TrainConfig.moment_batches).
            self.status.moment_batches = self.inner.set_moment_batches(len(contributors))
        if self.identity.node_id in contributors:
            self._set(rounds_contributed=self.status.rounds_contributed + 1)

    def _apply(
        self,
        round_: int,
        mean: torch.Tensor,
        commit: pb.Commit,
        skipped: list[int],
        bounds: tuple[int, ...],
    ) -> None:
        self._set_phase("applying")
        self.run_tokens += commit.tokens
        if commit.contributors:
            with self._theta_lock:
                before = self.state.copy()
                self.state.outer_step(mean, self.config.outer_config())
                for shard in skipped:  # a skipped shard's slice of θ does not move
                    start, end = bounds[shard], bounds[shard + 1]
                    self.state.params[start:end] = before.params[start:end]
                    self.state.momentum[start:end] = before.momentum[start:end]
        self.state_round = round_ + 1
        fingerprint = self.state.fingerprint()
        self.peer.set_state(self.state_round, self.state.params, self.state.momentum)
        reply = self._retry(lambda: self.client.report_fingerprint(round_, fingerprint))
        self._fingerprint_reports += 1
        unconfirmed, self._unconfirmed = self._unconfirmed, None
        if reply.resync:
            self._event(f"round {round_}: fingerprint disagrees with the commit: resync")
            self._resync(self.state_round)
            return
        if (
            unconfirmed is not None
            and unconfirmed[0] == round_ - 1
            and reply.previous_expected not in ("", unconfirmed[1])
        ):
            # Our state already disagreed a round ago (we reported before the others
            # agreed), so this one, built on it, is wrong too.
            self._event(f"round {round_ - 1}: fingerprint disagrees with the commit: resync")
            self._resync(self.state_round)
            return
        if not reply.expected:
            self._unconfirmed = (round_, fingerprint)
        self._log_fingerprint(round_, fingerprint)
        # Validation runs on its own copy of the model in a worker: never on the round's
        # critical path (a training replica in overlap mode is elsewhere, too).
        timing = dict(self._timings.get(round_, {}))
        self._evaluations.submit(
            self._evaluate_and_report, round_, self.state.params.clone(), commit, timing
        )
        self._maybe_checkpoint(round_, commit, fingerprint)

    def _log_fingerprint(self, round_: int, fingerprint: str) -> None:
        """One JSON line per round this node holds the state after — applied, or taken
        from a checkpoint or peer — unless the coordinator refused it at once (what
        `starling demo` compares across nodes)."""
        with (self.run_dir / "fingerprints.jsonl").open("a") as log_file:
            log_file.write(json.dumps({"round": round_, "fingerprint": fingerprint}) + "\n")

    def _log_timing(self, round_: int, extra: dict[str, Any]) -> None:
        """One JSON line per round this node trained in: when its training started and
        ended (unix s), compute (inner steps only), the exchange (bench/utilization.py
        reads these)."""
        timing = self._timings.pop(round_, None)
        if timing is None or "train_ended" not in timing:
            return
        entry = {"round": round_, **timing, **extra}
        with (self.run_dir / "rounds.jsonl").open("a") as log_file:
            log_file.write(json.dumps(entry) + "\n")

    def summary(self) -> dict[str, Any]:
        return {
            "node_id": self.identity.node_id,
            "rounds_contributed": self.status.rounds_contributed,
            "state_round": getattr(self, "state_round", 0),
            "bytes_sent": self.status.bytes_sent,
            "bytes_received": self.status.bytes_received,
            "compute_s": self.status.compute_s,
            # The optimizer built, not the config's word for it (a node that never
            # joined built none).
            "optimizer": self.inner.optimizer_name if hasattr(self, "inner") else None,
            "moment_batches": self.status.moment_batches,
            "diverged_rounds": self.status.diverged_rounds,
            "wall_s": time.monotonic() - self.started,
        }

    def _evaluate_and_report(
        self, round_: int, params: torch.Tensor, commit: pb.Commit, timing: dict[str, float]
    ) -> None:
        if self._eval_trainer is None:
            model = build_model(
                self.config.model_config(self.manifest.vocab_size),
                seed=self.config.run.seed,
                device=self.device,
            )
            self._eval_trainer = InnerTrainer(model, self.train_cfg, self.device)
        load_flat_parameters(self._eval_trainer.model, params)
        try:
            val_loss = self._eval_trainer.evaluate(self.val_batches)
        except Exception:  # dashboard data only: never stops the node
            log.exception("validation of round %d failed", round_)
            return
        self._event(
            f"round {round_} committed: {len(commit.contributors)} contributors, "
            f"{commit.tokens:,} tokens, val loss {val_loss:.4f}"
        )
        self._set(val_loss=val_loss)
        self._report_progress(round_, val_loss, timing)

    def _report_progress(self, round_: int, loss: float, timing: dict[str, float]) -> None:
        wall = time.monotonic() - self.started
        request = pb.ReportProgressRequest(
            round=round_,
            loss=loss,
            tokens_per_s=self.status.tokens_per_s,
            bytes_sent=self.status.bytes_sent,
            bytes_received=self.status.bytes_received,
            utilization=self.status.compute_s / wall if wall > 0 else 0.0,
            train_loss=timing.get("train_loss", 0.0),
            round_tokens=int(timing.get("tokens", 0)),
        )
        try:
            self.client.report_progress(request)
        except grpc.RpcError:
            pass  # dashboard data only

    def _maybe_checkpoint(self, round_: int, commit: pb.Commit, fingerprint: str) -> None:
        """The contributor with the smallest node id uploads a due checkpoint (others
        would only be refused as duplicates)."""
        contributors = sorted(c.node_id for c in commit.contributors)
        if not contributors or contributors[0] != self.identity.node_id:
            return
        state = self._retry(lambda: self.client.get_round(round_))
        deadline = time.monotonic() + 30.0
        while not state.commit.fingerprint and time.monotonic() < deadline:
            state = self._retry(
                functools.partial(
                    self.client.get_round, round_, known_version=state.version, wait_s=5.0
                )
            )
        if not state.checkpoint_due or state.commit.fingerprint != fingerprint:
            return
        blob = state_blob(self.state.params, self.state.momentum)
        try:
            self.client.upload_checkpoint(round_ + 1, blob, fingerprint)
            self._event(f"uploaded checkpoint {round_ + 1}")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                log.warning("checkpoint upload refused: %s", err.details())

    # --- catching up ------------------------------------------------------------------

    def _catch_up(self, current: int) -> None:
        """Applies the committed means of the rounds this node missed (owners keep the
        last 8); falls back to a fresh state when that is not possible."""
        self._set(phase="catching up")
        while self.state_round < current and not self.stop_event.is_set():
            # A checkpoint past our state is one download instead of several means
            # (and survives owners that left).
            if self._retry(self.client.get_run).latest_checkpoint.round > self.state_round:
                self._take_state(*self._latest_state(), source="a checkpoint")
                continue
            missed = self._retry(lambda: self.client.get_round(self.state_round))
            if missed.phase != "committed" or not missed.commit.contributors:
                if missed.phase == "committed":  # an empty round: nothing moved
                    self.state_round += 1
                    continue
                return  # not committed yet: wait for it in the main loop
            spec = spec_from_state(self.run.run_id, missed)
            result = self.peer.gather(spec)
            skipped = [s.shard for s in missed.commit.shards if s.status == "skipped"]
            fetched = {o.shard: o.mean_hash for o in result.shards if o.committed}
            if any(s.verifier for s in missed.commit.shards):
                missed, skipped = check_means(
                    self.client, self.peer, spec, missed, result.mean, fetched, skipped
                )
            missing = sorted(set(range(spec.plan.num_shards)) - set(fetched) - set(skipped))
            if missing:
                if self._adopt_peer_state(current):
                    return
                skipped = self._lost(missed.round, missing, skipped)
            self._apply(missed.round, result.mean, missed.commit, skipped, spec.plan.bounds)
            if self.state_round == missed.round + 1:  # not resynced meanwhile
                self._event(f"caught up with round {missed.round}")

    def _lost(self, round_: int, missing: list[int], skipped: list[int]) -> list[int]:
        """Shards whose committed mean nobody can fetch (their owner died after the
        commit, and no peer holds the state past it) count as skipped: their slice of θ
        does not move. Every node in this position decides alike, so fingerprints agree;
        a node that did fetch them is outvoted and resyncs from a peer."""
        self._event(f"round {round_}: the means of shards {missing} are lost: they do not move")
        return sorted(set(skipped) | set(missing))

    def _adopt_peer_state(self, at_least: int) -> bool:
        from_peer = self._state_from_peer(at_least)
        if from_peer is None:
            return False
        self._take_state(*from_peer, source="a peer")
        return True

    def _take_state(self, state: GlobalState, round_: int, source: str) -> None:
        """Adopts a whole global state (`round_` rounds in) from a checkpoint or a peer,
        both checked against the agreed fingerprint of round `round_` − 1."""
        self.state, self.state_round = state, round_
        self._unconfirmed = None  # this state's fingerprint is the agreed one
        self.peer.set_state(round_, state.params, state.momentum)
        if round_ > 0:
            self._log_fingerprint(round_ - 1, state.fingerprint())
        self._event(f"took the global state at round {round_} from {source}")

    def _resync(self, at_least: int) -> None:
        """A fresh global state: a peer's, when one holds a state at least `at_least`
        rounds in whose fingerprint is the agreed one; else the latest checkpoint, then
        catch up from there. (A round's mean can be lost with an owner that died after
        the commit: then only a peer that fetched it in time, or a later checkpoint, has
        the state.)"""
        self._resync_wanted.clear()
        self._reports_at_resync = self._fingerprint_reports
        if not self._adopt_peer_state(at_least):
            self._take_state(*self._latest_state(), source="the latest checkpoint")
        if self.state_round != self._last_resync_round:
            self._futile_resyncs = 0
        else:
            self._futile_resyncs += 1
            wait = min(RESYNC_BACKOFF_MAX_S, 0.5 * 2**self._futile_resyncs)
            self._event(
                f"round {self.state_round}: the agreed state cannot be rebuilt yet (means "
                f"lost, no peer or newer checkpoint holds it): next try in {wait:.0f} s"
            )
            self.stop_event.wait(wait)
        self._last_resync_round = self.state_round

    def _state_from_peer(self, at_least: int) -> tuple[GlobalState, int] | None:
        """The first owner of the latest planned round that serves a state ≥ at_least
        rounds in, checked against the coordinator's agreed fingerprint."""
        current = self._retry(lambda: self.client.get_round(wait_s=0.0))
        planned = current
        if not planned.plan.owners and current.round > 0:
            planned = self._retry(lambda: self.client.get_round(current.round - 1))
        for owner in planned.plan.owners:
            if owner.node_id == self.identity.node_id:
                continue
            endpoint = PeerEndpoint(
                owner.node_id, owner.address, owner.cert_fingerprint or None, owner.public_key
            )
            try:
                download = self.peer.fetch_state(endpoint)
            except ExchangeError as err:
                log.info("state from %s: %s", owner.node_id[:12], err)
                continue
            if download.round < max(at_least, 1):
                continue
            agreed = self._retry(functools.partial(self.client.get_round, download.round - 1))
            if agreed.commit.fingerprint != download.fingerprint:
                continue  # not (yet) the agreed state
            return GlobalState(download.params, download.momentum), download.round
        return None

    # --- plumbing ---------------------------------------------------------------------

    def _heartbeat_loop(self, interval: float) -> None:
        while not self.stop_event.wait(interval):
            try:
                reply = self._retry(
                    lambda: self.client.heartbeat(self.status.phase[:40], self.state_round)
                )
            except (grpc.RpcError, InterruptedError) as err:
                log.info("heartbeat: %s", err)
                continue
            # The coordinator flags a node whose fingerprint disagreed with the round's
            # agreed one (also when ours came in before the others agreed). A flag from
            # before our last resync is stale: it clears with our next matching report.
            if reply.resync and self._fingerprint_reports > self._reports_at_resync:
                self._resync_wanted.set()

    def _retry(self, call: Callable[[], Any], rejoin: bool = True) -> Any:
        """`call`, retried while the coordinator is unreachable (it may be restarting),
        and once more after joining again if the coordinator expired us (a long stall,
        or a lease that lapsed while it was down)."""
        deadline = time.monotonic() + RECONNECT_S
        delay = 0.2
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                if (
                    rejoin
                    and code == grpc.StatusCode.PERMISSION_DENIED
                    and ("join again" in details or "join first" in details)
                ):
                    with self._rejoining:
                        self._join()
                    rejoin = False
                    continue
                if code not in RETRYABLE or time.monotonic() + delay > deadline:
                    raise
            if self.stop_event.wait(delay):
                raise InterruptedError("stopping")
            delay = min(2 * delay, RETRY_MAX_DELAY_S)

    def _set_phase(self, phase: str, **changes: Any) -> None:
        """A phase change, shown only when the round loop itself is in it: in overlap
        mode the exchange and outer step run in a worker while the loop trains."""
        if threading.current_thread() is self._loop_thread:
            changes["phase"] = phase
        self._set(**changes)

    def _set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.status, key, value)
        self.status.wall_s = time.monotonic() - self.started
        self.on_update(self.status)

    def _event(self, text: str) -> None:
        log.info(text)
        self.status.events.append(text)
        del self.status.events[:-20]
        self.on_update(self.status)


def _device_name(device: torch.device) -> str:
    """ "cpu", "mps", or "cuda:0 NVIDIA GeForce RTX 4090" (what the dashboard shows)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return str(device)


def _device_memory(device: torch.device) -> int:
    """Bytes of memory the device trains in: the GPU's, else the machine's RAM."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 0


def _address_toward(host: str) -> str:
    """This machine's address on the route to `host` (what peers should dial)."""
    if is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # no packet is sent: this only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
