"""bench/bit_identity.py: the outer loop's bits are pinned across hardware.

The expected fingerprint was produced on this project's x86 CI CPU (AMD EPYC, torch
2.13.0+cpu) and reproduced bit for bit on an Intel Xeon host with torch 2.11.0+cu130 and
on that host's H100 GPU (bench/bit_identity.py --device cuda): if a change to
`weighted_mean`, `outer_step` or the fingerprint layout alters a single bit, nodes on
different hardware could stop agreeing, and this fails.

The codec fingerprints (each codec's encodings of 20 rounds of 4 contributions and their
mean, as a shard's owner and verifier compute them) were produced on the CI CPU: a
change to any codec's bytes makes the reducers of two versions disagree, which the
coordinator takes for a lie, so it must be deliberate. All but hivemind-uint8's were
reproduced on the Intel Xeon host (torch 2.11.0, numpy 2.3.5); hivemind-uint8's differ
there, which is why runs that verify means refuse that codec (starling.runconfig).
Top-k's was pinned again on the CI CPU on 2026-12-05, when the mean came to keep every
contributor's entries (codecs.mean_codec: k × 4 per chunk); its selection code, which
the Xeon host reproduced, did not change. Top-k with 2-bit values (topk2) was pinned on
the CI CPU only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bit_identity.py"
# 20 rounds of 4 contributions over 2^21 values, outer lr 0.7, Nesterov momentum 0.9.
PINNED = "d929cb26ead9b332742bc37218c23b4840171327ac6b3c14de2decdf9b809482"
# 2^16 values per contribution; odd rounds on a grid of 2^-13 (ties).
PINNED_CODECS = {
    "fp32": "e5ba9e60b026bb58f1a213bb321fe9b6c8eb6685d553c08b6e774ac2e4bc18da",
    "bf16": "d48ec2d4960cf5f659120415ca2c57e487a31c3bd17c19e555987c3f6b5cdd78",
    "int8": "433f29826b84da02894e1dca6ee9893ba75c05c77d965d485fb93404b5f6a70e",
    "int4": "412867bce68a3c510248b33228cf1ef53696eadbc8c80c2d3508f0312790c22c",
    "int2": "3a089eb67ba4fb63f1a230d41a12067ff0ff338ddc144bfc98e9e12bdffd43ac",
    "topk": "8dc51b47204c29a4e3d820b6d7bba391268a685954fc00eb845d78081b8e0173",
    "topk2": "47056f7ca198ea1c98a10f779731dc184ed7d881acfa9e4ac656e65a8a66bce7",
    "hivemind-fp16": "038b49c987a189daae60686d2c2d10a467cf5a1f60048cdc3a27905c26e06e4b",
    "hivemind-uint8": "5f6808f7dabbaa002bf5ffbf28d3c0eda29cdc186ba4ac3be5c11121dd11db8d",
}


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCH), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_outer_loop_reproduces_the_pinned_fingerprint() -> None:
    run = bench("--expect", PINNED, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["final_fingerprint"] == PINNED and report["matches_expected"] is True
    assert len(set(report["fingerprints"])) == 20  # every round moved the state
    assert report["codec_fingerprints"] == PINNED_CODECS
    assert report["codecs_thread_invariant"] is True


def test_a_different_fingerprint_fails_the_comparison(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"final_fingerprint": "0" * 64}) + "\n")
    run = bench("--rounds", "2", "--params", "1000", "--expect", str(other), "--json")
    assert run.returncode == 1
    assert json.loads(run.stdout.strip().splitlines()[-1])["matches_expected"] is False
    small = ("--rounds", "2", "--params", "1000", "--codec-params", "999")
    ours = bench(*small, "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    report = json.loads(ours.stdout.strip().splitlines()[-1])
    report["codec_fingerprints"]["int4"] = "0" * 64  # another machine encodes int4 otherwise
    other.write_text(json.dumps(report) + "\n")
    run = bench(*small, "--expect", str(other))
    assert run.returncode == 1
    assert "codecs_match_expected: {'fp32': True, 'bf16': True, 'int8': True, 'int4': False" in (
        run.stdout
    )
    bad = bench("--expect", "not-a-fingerprint")
    assert bad.returncode != 0 and "neither a JSON output file" in bad.stderr
