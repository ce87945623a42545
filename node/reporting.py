"""Token reports off the training loop's critical path.

The coordinator counts the tokens each node trains in a round (the round closes at its
token budget, or when every node did its inner steps). A blocking ReportTokens call
after every inner step would cost one round trip per step — 50 ms on a home link, as
much as a GPU step — so a reporter thread sends what has accumulated whenever no report
is in flight, at most one every MIN_INTERVAL_S: one report per step on a fast link
with slow steps, several steps per report otherwise, and never a stall of the training
loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from starling.v1 import coordinator_pb2 as pb

# At most one report per this long (besides the last): a tiny model's inner step takes a
# few milliseconds, and a report per step from every node would be hundreds of requests
# a second each (over the coordinator's per-peer budget, [defences] requests_per_s).
MIN_INTERVAL_S = 0.1

# (file, tokens, done) → the coordinator's reply; retries and rejoins are the caller's.
SendReport = Callable[[str, int, bool], pb.ReportTokensResponse]


class TokenReporter:
    """Reports one round's tokens in the background. `closed` turns true when the
    coordinator says the round closed (its reply, or FAILED_PRECONDITION: it closed
    before this report); `lease_lost` when our data lease lapsed (PERMISSION_DENIED),
    so the trainer takes a new one."""

    def __init__(self, send: SendReport) -> None:
        self._send = send
        self._lock = threading.Condition()
        self._pending: dict[str, int] = {}  # shard file → tokens not yet reported
        self._done = False
        self._in_flight = False
        self._stopping = False
        self._error: BaseException | None = None
        self.closed = threading.Event()
        self.lease_lost = threading.Event()
        # Tokens the coordinator answered for: what it counted for this node in the round,
        # and so the most the node may weigh in the round's mean (its contribution
        # headers declare this, not the tokens trained after the round closed).
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="token-reports", daemon=True)
        self._thread.start()

    def add(self, file: str, tokens: int, done: bool = False) -> None:
        """Queues tokens trained on `file`; `done`: this node finished its inner steps."""
        with self._lock:
            self._raise_error()
            self._pending[file] = self._pending.get(file, 0) + tokens
            self._done = self._done or done
            self._lock.notify_all()

    def flush(self, timeout: float) -> None:
        """Waits until every queued token is reported (or the round closed)."""
        with self._lock:
            finished = self._lock.wait_for(
                lambda: (
                    self._error is not None
                    or self.closed.is_set()
                    or (not self._pending and not self._in_flight)
                ),
                timeout,
            )
            self._raise_error()
            if not finished:
                raise TimeoutError("token reports did not finish in time")

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or bool(self._pending))
                if not self._pending or self.closed.is_set():
                    if self._stopping or self.closed.is_set():
                        self._pending.clear()
                        self._lock.notify_all()
                        if self._stopping:
                            return
                    continue
                file, tokens = next(iter(self._pending.items()))
                del self._pending[file]
                done = self._done and not self._pending  # `done` rides on the last report
                self._in_flight = True
            sent_at = time.monotonic()
            try:
                reply = self._send(file, tokens, done)
                with self._lock:
                    self.accepted += tokens
                if reply.closed:
                    self.closed.set()
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.closed.set()  # closed meanwhile: these tokens are ours, not the round's
                elif code == grpc.StatusCode.PERMISSION_DENIED and "lease" in details:
                    self.lease_lost.set()
                else:
                    self._fail(err)
            except BaseException as err:  # InterruptedError when stopping, among others
                self._fail(err)
            finally:
                with self._lock:
                    self._in_flight = False
                    self._lock.notify_all()
                    # Paced: tokens trained meanwhile ride on the next report (the last
                    # one, `done`, goes at once).
                    self._lock.wait_for(
                        lambda: self._stopping or self._done or self.closed.is_set(),
                        max(0.0, sent_at + MIN_INTERVAL_S - time.monotonic()),
                    )

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            self._error = err
            self._pending.clear()
            self._lock.notify_all()
