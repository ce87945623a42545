"""Exchange speed: Starling's gRPC sharded all-reduce against hivemind's
DecentralizedAverager and torch.distributed all_reduce over gloo, same payload, same
number of peers (separate processes on this machine), one run.

    python bench/exchange.py --peers 4 --megabytes 100 --codecs fp32,int8 --json
    python bench/exchange.py --peers 4 --megabytes 100 --codecs fp32 --upload-mbps 100 --json

Each system averages K seeded normal fp32 vectors (peer i: seed + i) for `warmup`
untimed and `rounds` timed rounds, every peer starting a round at the same instant; a
round's time is the slowest peer's, the median over rounds is reported, and every
result is checked against the exact mean (float64). Starling's contributions carry equal
weights here, so its mean is the plain mean like the others'.

With --upload-mbps X every system's links are capped at X Mbit/s both ways: Starling by
its own limiter on loopback, and (where ../shared/tools and root are available) all
three by kernel shaping in network namespaces (tbf, from ../shared/tools/netns_setup.sh),
where Starling runs with TLS as it would off loopback. The wire bound is
2·(K−1)/K · payload / bandwidth: what every peer must at least send.

The last output line is {"results": [{"system", "codec", "peers", "megabytes",
"median_s", "max_abs_err", "bytes_sent_per_peer", ...}, ...], "wire_bound_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # exchange_baselines, beside us

import exchange_baselines as baselines  # noqa: E402

from starling.codecs import make_codec  # noqa: E402
from starling.exchange.harness import Cluster  # noqa: E402


def run_starling(
    peers: int,
    megabytes: float,
    codec: str,
    rounds: int,
    warmup: int,
    upload_mbps: float | None,
    seed: int,
    tls: bool,
    shaped: bool = False,
) -> dict[str, Any]:
    """Starling's exchange among `peers` harness processes, every peer an owner."""
    numel = int(megabytes * 1e6 / 4)
    limiter = None if shaped else upload_mbps  # shaped: the kernel caps the links
    with baselines.shaped_links(peers, upload_mbps if shaped else None) as hosts:
        configs = [
            {
                "run_id": "bench",
                "seed": seed + i,
                "tls": tls,
                "host": host.addr,
                "launcher": ["ip", "netns", "exec", host.netns] if host.netns else [],
                "upload_mbps": limiter,
                "download_mbps": limiter,
            }
            for i, host in enumerate(hosts)
        ]
        with Cluster(configs, ready_timeout=300) as cluster:
            times, errors, sent = [], [], []
            wire_s = 2 * (peers - 1) / peers * numel * 4 * 8 / (upload_mbps or 1e12) / 1e6
            for round_ in range(warmup + rounds):
                timed = round_ >= warmup
                spec = cluster.spec(round_, codec, numel, deadline_s=120 + 5 * wire_s)
                # The exact mean is checked once per timed round on every peer.
                results = cluster.run_round(spec, [1] * peers, start_delay=0.5, check=timed)
                if any(r is None or r["missing_shards"] for r in results):
                    raise RuntimeError(f"starling round {round_} failed: {results}")
                if timed:
                    times.append(max(r["wall_s"] for r in results if r))
                    errors.append(max(r["max_abs_err"] for r in results if r))
                    sent.append(
                        statistics.mean(
                            sum(t[0] for t in r["traffic"].values()) for r in results if r
                        )
                    )
    return {
        "system": "starling",
        "codec": codec,
        "peers": peers,
        "megabytes": megabytes,
        "median_s": statistics.median(times),
        "times_s": times,
        "max_abs_err": max(errors),
        "bytes_sent_per_peer": int(statistics.mean(sent)),
        "bytes_measured": True,
        "link": "netns-tbf" if shaped else ("loopback-limiter" if upload_mbps else "loopback"),
        "tls": tls,
        "encoded_bytes_ratio": make_codec("fp32").encoded_size(numel)
        / make_codec(codec).encoded_size(numel),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--codecs", default="fp32,int8", help="Starling codecs, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--upload-mbps", type=float, default=None)
    parser.add_argument("--systems", default="starling,hivemind,gloo")
    parser.add_argument(
        "--tls", choices=("on", "off", "both"), default="both", help="Starling on loopback"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="only JSON lines on stdout")
    args = parser.parse_args()
    if args.peers < 2 or args.rounds < 1 or args.megabytes <= 0:
        parser.error("need --peers >= 2, --rounds >= 1 and --megabytes > 0")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    for codec in codecs:
        make_codec(codec)  # a bad name fails now, not after the baselines ran
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - {"starling", "hivemind", "gloo"}
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}: use starling, hivemind, gloo")
    common = dict(
        peers=args.peers,
        megabytes=args.megabytes,
        rounds=args.rounds,
        warmup=args.warmup,
        upload_mbps=args.upload_mbps,
        seed=args.seed,
    )
    shaping = args.upload_mbps is not None and os.geteuid() == 0
    shaping = shaping and baselines.NETNS_SETUP.is_file()
    results: list[dict[str, Any]] = []

    def report(result: dict[str, Any]) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)

    started = time.time()
    if "starling" in systems:
        tls_modes = {"on": [True], "off": [False], "both": [False, True]}[args.tls]
        for codec in codecs:
            for tls in tls_modes:
                report(run_starling(codec=codec, tls=tls, **common))  # type: ignore[arg-type]
        if shaping:  # the same kernel-shaped links as the baselines get
            for codec in codecs:
                result = run_starling(codec=codec, tls=True, shaped=True, **common)  # type: ignore[arg-type]
                report(result)
    if args.upload_mbps is not None and not shaping and set(systems) - {"starling"}:
        print(
            "note: hivemind and gloo need kernel shaping (root and ../shared/tools) "
            "for --upload-mbps; skipped",
            file=sys.stderr,
        )
    else:
        if "hivemind" in systems:
            report(baselines.run_hivemind(**common))  # type: ignore[arg-type]
        if "gloo" in systems:
            report(baselines.run_gloo(**common))  # type: ignore[arg-type]
    payload = args.megabytes * 1e6
    wire_bound = None
    if args.upload_mbps:
        wire_bound = 2 * (args.peers - 1) / args.peers * payload * 8 / (args.upload_mbps * 1e6)
    print(
        json.dumps(
            {
                "results": results,
                "wire_bound_s": wire_bound,
                "config": vars(args),
                "cpus": os.cpu_count(),
                "wall_s": time.time() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
