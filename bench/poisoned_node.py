"""A Byzantine node: `python bench/poisoned_node.py KIND <the arguments of starling>`
runs the starling CLI (e.g. `node join URL ...`) with every contribution it makes
poisoned in one way. What the owners' checks must stop (bench/chaos.py, and
tests/test_poisoning.py):

  nan        a NaN in each payload's first float (a value, or a block's scale)
  scale      the pseudo-gradient × 100
  sign_flip  the pseudo-gradient × −1
  noise      Gaussian noise with the pseudo-gradient's norm
  shape      every shard's payload encodes one value too few
  stale      each remote shard gets last round's signed contribution (round r−1)
  replay     besides its own contribution, another node's signed contribution that
             this node received as an owner last round, re-sent as it was and with
             this round's number
  copy       on the shard it owns, another node's payload of this round instead of
             its own (its other shards carry its honest slices)
  frame      a lying owner: its own contributions are honest, but on each shard it
             owns it reports one honest contributor as rejected (a norm outlier)
  omit       a censoring reducer: its own contributions are honest, but on each shard
             it owns or verifies it drops one honest contributor's push (another one
             each round) after acknowledging it, as if it never arrived
  misreport  a lying reducer: its own contributions are honest, but in its report of each
             shard it owns or verifies it gives one honest contributor's contribution
             another payload hash (another one each round), so that owner and
             verifier disagree and the contributor is out of the round
  withhold   a lying reducer as `misreport` that also refuses to serve its evidence
             (Peer.FetchEvidence answers UNAVAILABLE), so that no verdict can convict it
  wrong_mean a lying owner: its own contributions are honest, but every mean it
             commits (as a shard's owner or verifier) is negated, signed and served
             as if right
  inflate    an honest pseudo-gradient whose signed headers weigh it by 1,000× the
             tokens the coordinator counted for it, so that it would outweigh everyone
             else's in the mean (a norm check cannot see a weight)
  diverge    not an attack but a fault: every other round its update is one its codec
             cannot carry (what training that diverged gives), so it withdraws from the
             round (Coordinator.Withdraw), reduces its shards, applies the mean and
             restarts from θ; its POISON line says "withdrew"
  none       honest (bench/chaos.py runs every node through here)

With STARLING_CHAOS_DUMP=DIR set, every payload pushed is written to
DIR/ROUND/SHARD/NODE.bin and every round's combined mean, as the node applies it, to
DIR/ROUND/mean-NODE.safetensors (with the shards it fetched),
so that bench/chaos.py can check each committed mean against its listed contributions.

Each poisoned push prints one line `POISON {"kind", "round", "shard", "status"}` to
stderr, with the status the owner answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import save_file

import starling.node.daemon as daemon
from starling.cli import main
from starling.codecs import HEADER_BYTES, CodecError, ErrorFeedback, mean_codec
from starling.exchange import client as exchange_client
from starling.exchange import owner as exchange_owner
from starling.exchange import peer as exchange_peer
from starling.exchange.plan import RoundSpec, ShardPlan
from starling.node.rounds import ExchangeOutcome

KINDS = (
    "nan",
    "scale",
    "sign_flip",
    "noise",
    "shape",
    "stale",
    "replay",
    "copy",
    "frame",
    "omit",
    "misreport",
    "withhold",
    "wrong_mean",
    "inflate",
    "diverge",
    "none",
)
INFLATION = 1000
DUMP = os.environ.get("STARLING_CHAOS_DUMP")
kind = "none"  # set from the command line by run()
encoded = 0  # updates this node has encoded (diverge: every other one diverges)


def report(round_: int, shard: int, status: str) -> None:
    line = {"kind": kind, "round": round_, "shard": shard, "status": status}
    print("POISON " + json.dumps(line), file=sys.stderr, flush=True)


# --- poisoned values: the pseudo-gradient before it is encoded -----------------------

encode_shards = daemon.encode_shards


# Where each codec's first float sits after the header, and its format: a NaN there is
# what a NaN in the pseudo-gradient gives a codec that does not refuse it (fp32), and what
# the owners must refuse (the lossy codecs' encoders refuse NaN themselves now).
NAN = float("nan")
NAN_FIELD: dict[str, tuple[int, str, float | int]] = {  # offset after the header, format, NaN
    "fp32": (0, "<f", NAN),
    "bf16": (0, "<H", 0x7FC0),  # bf16's quiet NaN, as its bits
    "int8": (0, "<e", NAN),  # the first block's fp16 scale
    "int4": (0, "<e", NAN),
    "int2": (0, "<e", NAN),
    "topk": (4, "<e", NAN),  # the first chunk's fp16 scale, after the u32 k
    "topk2": (4, "<f", NAN),  # the first chunk's low magnitude
}


def with_nan(payload: bytes, codec_name: str) -> bytes:
    if codec_name not in NAN_FIELD:
        raise SystemExit(f"the nan poison does not know codec {codec_name}'s layout")
    offset, fmt, value = NAN_FIELD[codec_name]
    data = bytearray(payload)
    struct.pack_into(fmt, data, HEADER_BYTES + offset, value)
    return bytes(data)


def poisoned_encode(
    plan: ShardPlan, delta: torch.Tensor, feedback: ErrorFeedback
) -> tuple[list[bytes], Any]:
    global encoded
    encoded += 1
    if kind == "diverge" and encoded % 2 == 0:
        raise CodecError("an update beyond the codec's range (bench/poisoned_node.py: diverge)")
    delta = delta.clone()
    if kind == "scale":
        delta *= 100
    elif kind == "sign_flip":
        delta.neg_()
    elif kind == "noise":
        noise = torch.randn_like(delta)
        delta = noise * (delta.norm() / noise.norm())
    payloads, rest = encode_shards(plan, delta, feedback)
    if kind == "nan":
        payloads = [with_nan(payload, feedback.codec.name) for payload in payloads]
    if kind == "shape":
        payloads = [
            feedback.codec.encode(delta[plan.bounds[s] : plan.bounds[s + 1] - 1].clone())
            for s in range(plan.num_shards)
        ]
    return payloads, rest


# --- poisoned messages: stale, replayed, copied ----------------------------------------

push = exchange_client.ExchangeClient._push
# (shard, whom: "owner" or "verifier") -> (round, payload) of our last push there
sent: dict[tuple[int, str], tuple[int, bytes]] = {}
received: dict[int, list[tuple[Any, bytes]]] = {}  # round -> [(header, payload)] as owner


async def poisoned_push(
    self: exchange_client.ExchangeClient,
    spec: RoundSpec,
    shard: int,
    tokens: int,
    payload: bytes,
    local: exchange_owner.OwnerService | None,
    window: asyncio.Semaphore | None = None,
    to: Any = None,
) -> None:
    """Pushes to the shard's owner (or to `to`, its verifier), poisoned by kind."""
    receiver = to or spec.owners[shard]
    remote = receiver.node_id != self.identity.node_id
    if DUMP:
        folder = Path(DUMP) / str(spec.round) / str(shard)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.identity.node_id}.bin").write_bytes(payload)
    key = (shard, "owner" if to is None else "verifier")
    if kind == "stale" and remote and key in sent and sent[key][0] < spec.round:
        old_round, old_payload = sent[key]
        stale = dataclasses.replace(spec, round=old_round)  # signed for round r−1
        sent[key] = (spec.round, payload)
        stale_push = push(self, stale, shard, tokens, old_payload, local, window, to)
        await _reported(stale_push, spec, shard)
        return
    sent[key] = (spec.round, payload)
    await push(self, spec, shard, tokens, payload, local, window, to)
    if kind == "replay" and to is None and shard == 0 and received.get(spec.round - 1):
        # Another node's signed contribution that this node held as an owner last round,
        # sent again to that shard's owner now (often this node itself): once as it was
        # (round r−1), once with this round's number (the signature no longer verifies).
        header, body = received[spec.round - 1][0]
        renumbered = type(header).FromString(header.SerializeToString())
        renumbered.round = spec.round
        for replayed in (header, renumbered):
            await _reported(_raw_push(self, spec, header.shard, replayed, body), spec, shard)


async def _raw_push(
    self: exchange_client.ExchangeClient, spec: RoundSpec, shard: int, header: Any, body: bytes
) -> None:
    calls = await self._calls(spec.owners[shard])
    stream = self._stream(spec.round, spec.owners[shard].node_id, header, body)
    await calls.push_contribution(stream, timeout=max(0.1, spec.deadline - time.time()))


async def _reported(call: Any, spec: RoundSpec, shard: int) -> None:
    try:
        await call
        report(spec.round, shard, "OK")
    except exchange_client.ExchangeError as err:
        report(spec.round, shard, err.code.name if err.code else str(err))
    except grpc.aio.AioRpcError as err:
        report(spec.round, shard, err.code().name)


exchange_round = daemon.exchange_round


def dumping_exchange_round(*args: Any, **kwargs: Any) -> ExchangeOutcome:
    """The node's combined mean of the round, as it applies it: each shard from its
    latest owner (after a reassignment), with the shards it did get listed, so that
    skipped and unfetched shards are not compared."""
    if kind == "inflate":
        client, peer, state, payloads, tokens = args
        args = (client, peer, state, payloads, min(tokens * INFLATION, exchange_owner.MAX_TOKENS))
        report(state.round, -1, "declared " + str(args[4]))
    if args[3] is None:  # no payloads: withdrawn (diverge)
        report(args[2].round, -1, "withdrew")
    outcome = exchange_round(*args, **kwargs)
    if DUMP:
        state, peer = args[2], args[1]
        folder = Path(DUMP) / str(state.round)
        folder.mkdir(parents=True, exist_ok=True)
        shards = len(state.plan.bounds) - 1
        fetched = sorted(set(range(shards)) - set(outcome.skipped) - set(outcome.missing))
        save_file(
            {"mean": outcome.mean.contiguous(), "fetched": torch.tensor(fetched or [-1])},
            str(folder / f"mean-{peer.identity.node_id}.safetensors"),
        )
    return outcome


accept = exchange_owner.OwnerService._accept


async def capturing_accept(
    self: exchange_owner.OwnerService, reduction: Any, header: Any, payload: Any
) -> None:
    if header.sender != self.identity.node_id:
        received.setdefault(header.round, []).append((header, bytes(payload)))
        for old in [r for r in received if r < header.round - 1]:
            del received[old]
    if kind == "omit":
        others = sorted(set(reduction.spec.participants) - {self.identity.node_id})
        if others and header.sender == others[header.round % len(others)]:
            report(header.round, header.shard, f"OMITTED {header.sender}")
            return  # acknowledged, never held: the report will say it did not arrive
    await accept(self, reduction, header, payload)


contribute_local = exchange_owner.OwnerService.contribute_local


async def copying_contribute_local(
    self: exchange_owner.OwnerService, round_: int, shard: int, tokens: int, payload: bytes
) -> None:
    if kind == "copy":
        spec = self._specs[round_]
        while time.time() < spec.deadline - 1.0:  # a copy needs an original first
            others = [p for h, p in received.get(round_, []) if h.shard == shard]
            if others:
                payload = others[0]
                break
            await asyncio.sleep(0.05)
        try:
            await contribute_local(self, round_, shard, tokens, payload)
            report(round_, shard, "OK")
        except exchange_owner.ExchangeAbort as err:
            report(round_, shard, err.code.name)
            raise
        return
    await contribute_local(self, round_, shard, tokens, payload)


# --- a lying owner: frames an honest contributor ---------------------------------------

screen_held = exchange_owner.OwnerService._screen


async def framing_screen(self: exchange_owner.OwnerService, reduction: Any) -> None:
    """After the real screen, reports one honest contributor of each shard it owns as a
    norm outlier (what an owner that wants a rival banned would claim)."""
    if kind == "frame":
        others = sorted(n for n in reduction.held if n != self.identity.node_id)
        if others:
            victim = others[0]
            del reduction.held[victim]
            reduction.excluded[victim] = (
                f"{exchange_owner.REJECTED}: norm 12.5x the round's median (limit 10x)"
            )
            report(reduction.spec.round, reduction.shard, f"FRAMED {victim}")
    await screen_held(self, reduction)


# --- a lying reducer: misreports a contribution's hash ---------------------------------

holders = exchange_peer.ExchangePeer.holders


def misreporting_holders(
    self: exchange_peer.ExchangePeer, round_: int, timeout: float
) -> dict[int, dict[str, tuple[int, bytes]]]:
    held = {shard: dict(by_node) for shard, by_node in holders(self, round_, timeout).items()}
    if kind not in ("misreport", "withhold"):
        return held
    others = sorted({n for by_node in held.values() for n in by_node} - {self.identity.node_id})
    if not others:
        return held
    victim = others[round_ % len(others)]
    for shard, by_node in held.items():
        if victim in by_node:
            tokens, digest = by_node[victim]
            by_node[victim] = (tokens, bytes([digest[0] ^ 0xFF]) + digest[1:])
            report(round_, shard, f"MISREPORTED {victim}")
    return held


fetch_evidence = exchange_owner.OwnerService.FetchEvidence


async def withholding_fetch_evidence(
    self: exchange_owner.OwnerService, request: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    if kind == "withhold":
        report(request.round, request.shard, "WITHHELD")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
    async for message in fetch_evidence(self, request, context):
        yield message


# --- a lying owner: serves a wrong mean ------------------------------------------------

weighted_mean_payload = exchange_owner._weighted_mean_payload


def lying_mean_payload(reduction: Any, ordered: list[tuple[str, Any]]) -> bytes | None:
    """The codec's encoding of the negated mean: what an owner that wants the run to
    unlearn would serve (signed, with the right contributor list)."""
    if kind != "wrong_mean" or not ordered:
        return weighted_mean_payload(reduction, ordered)
    values = [h.values for _, h in ordered]
    mean = exchange_owner.weighted_mean_f64(values, [h.tokens for _, h in ordered])
    report(reduction.spec.round, reduction.shard, "WRONG MEAN")
    return mean_codec(reduction.codec, len(ordered)).encode(mean.neg_())


def run() -> None:
    """Poisons this process's node code by `sys.argv[1]` and runs the starling CLI with
    the rest of the arguments. (Importing this module patches nothing: bench/chaos.py
    imports it for KINDS.)"""
    global kind
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        raise SystemExit(f"usage: poisoned_node.py KIND ARGS...; KIND one of {', '.join(KINDS)}")
    kind = sys.argv.pop(1)
    daemon.encode_shards = poisoned_encode
    exchange_client.ExchangeClient._push = poisoned_push
    daemon.exchange_round = dumping_exchange_round
    exchange_owner.OwnerService._accept = capturing_accept
    exchange_owner.OwnerService.contribute_local = copying_contribute_local
    exchange_owner.OwnerService._screen = framing_screen
    exchange_owner._weighted_mean_payload = lying_mean_payload
    exchange_peer.ExchangePeer.holders = misreporting_holders  # type: ignore[method-assign]
    exchange_owner.OwnerService.FetchEvidence = withholding_fetch_evidence
    sys.argv[0] = "starling"
    main()


if __name__ == "__main__":
    run()
