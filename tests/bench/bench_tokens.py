"""Benchmark: what issuing and verifying an access token costs per call, with warm keys.

    .venv/bin/python -m tests.bench.bench_tokens [--iterations 20000]

    sign                 issue_access_token: claims, JSON, Ed25519 signature
    verify, new token    TokenVerifier.verify of the token just signed, on one long-lived verifier: its key
                         map and header cache are warm, the signature is checked; a session's first call
    verify, same token   one token verified again and again: what every later call of a session pays
    ed25519 verify       cryptography's Ed25519PublicKey.verify alone on that new token: the floor under
                         "verify, new token"

The operations take turns, each call timed on its own, so the host's speed drifting (shared 2-core hosts)
weighs on all of them alike. The table gives the median and 99th percentile in microseconds, and for the
verify rows the median's share of the target (verify p50 <= 100 us).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from services.auth.signing import KeyRing, generate_signing_key, issue_access_token
from services.runtime.tokens import TokenVerifier, base64url_decode

VERIFY_TARGET_US = 100.0
_Result = TypeVar("_Result")


def _timed(durations: list[float], call: Callable[[], _Result]) -> _Result:
    started = time.perf_counter_ns()
    result = call()
    durations.append((time.perf_counter_ns() - started) / 1000)
    return result


def _percentile(durations: list[float], fraction: float) -> float:
    ordered = sorted(durations)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run(iterations: int) -> str:
    ring = KeyRing([generate_signing_key(time.time())])
    public_key = ring.current.public_key

    def issue() -> str:
        token, _ = issue_access_token(
            ring,
            user_id="0b9f6a52-5d1e-4f0e-9a53-8e1f2c3d4b5a",
            email="mina@example.com",
            zone_id="zone-seoul",
            org_id="org-7",
            role="student",
            permissions=["exam.take", "course.read", "profile.write"],
            session_id="8c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
            now=time.time(),
        )
        return token

    verifier = TokenVerifier(ring.public_keys(time.time()))
    repeated = issue()
    verifier.verify(repeated)  # warm: the key map and the header cache
    results: dict[str, list[float]] = {
        "sign": [],
        "verify, new token": [],
        "verify, same token": [],
        "ed25519 verify": [],
    }
    gc.collect()
    for iteration in range(iterations):
        token = _timed(results["sign"], issue)
        signing_input, _, signature = token.rpartition(".")
        verifications: list[tuple[str, Callable[[], object]]] = [
            ("verify, new token", partial(verifier.verify, token)),
            ("ed25519 verify", partial(public_key.verify, base64url_decode(signature), signing_input.encode())),
        ]
        # Whichever checks the signature second finds the CPU's caches warm from the first: take turns.
        for name, call in verifications[:: 1 if iteration % 2 else -1]:
            _timed(results[name], call)
        _timed(results["verify, same token"], partial(verifier.verify, repeated))

    lines = [
        f"access tokens: {iterations} calls each, {os.cpu_count()} CPUs, token {len(repeated)} bytes",
        "",
        f"{'operation':<20} {'p50 us':>8} {'p99 us':>8} {'p50 of 100 us target':>21}",
    ]
    for name, durations in results.items():
        p50 = _percentile(durations, 0.5)
        share = f"{p50 / VERIFY_TARGET_US:.0%}" if name.startswith("verify") else "-"
        lines.append(f"{name:<20} {p50:>8.1f} {_percentile(durations, 0.99):>8.1f} {share:>21}")
    overhead = _percentile(results["verify, new token"], 0.5) - _percentile(results["ed25519 verify"], 0.5)
    lines += ["", f"verify's own work around the Ed25519 check (p50 difference): {overhead:.1f} us"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    print(run(args.iterations))


if __name__ == "__main__":
    main()
