"""Benchmark: what the service runtime and mTLS cost a saturated server, on a no-op unary RPC.

    .venv/bin/python -m tests.bench.bench_runtime [--seconds 2] [--rounds 15]

Four servers serve the same no-op `Echo`, each in its own process, all pinned to CPU 0:

    bare-plaintext   a bare grpc.aio servicer, no TLS, no interceptors
    bare-mtls        the same servicer behind mTLS (client certificates required)
    runtime-linkerd  the full runtime (identity/authz, trace context, call context, errors, logs, metrics),
                     plaintext with the l5d-client-id header, as behind Linkerd
    runtime-mtls     the full runtime with mTLS: what every service runs locally

One load generator on CPU 1 keeps 32 calls in flight on one HTTP/2 connection per server. It speaks gRPC
directly over `h2` (no grpc client stack): a Python grpc client costs more CPU per call than the server it
loads, so it would measure itself; this one costs a fraction of a call's server time, so the server is the
bottleneck and its throughput is its capacity. Each round loads every server for `--seconds`, in a new
random order; ratios are taken within a round (the machine's speed drifts between rounds on shared 2-core
hosts) and the median over rounds is reported, with the server's CPU time per call from /proc beside it.
Targets: runtime-mtls >= 85% of bare-mtls throughput; bare-mtls >= 90% of bare-plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.config import Transport
from services.runtime.pki import ensure_credentials
from services.runtime.server import Service
from services.runtime.telemetry import configure_logging, configure_tracing
from tests.bench.h2load import IN_FLIGHT, GrpcLoad
from tests.support.mesh import make_config, mesh_catalog
from tests.support.probe import ProbeServicer
from tests.support.probe import servicers as probe_servicers

MODES = ("bare-plaintext", "bare-mtls", "runtime-linkerd", "runtime-mtls")
BASELINES = {"bare-mtls": "bare-plaintext", "runtime-linkerd": "bare-plaintext", "runtime-mtls": "bare-mtls"}
ECHO_PATH = "/megacity.testing.v1.ProbeService/Echo"
LINKERD_OPS = "ops.megacity.serviceaccount.identity.linkerd.cluster.local"


# --- the servers ----------------------------------------------------------------------------------------


async def _serve(mode: str, pki: Path) -> None:
    catalog = mesh_catalog()
    if mode.startswith("runtime"):
        configure_logging("info", "probe")
        configure_tracing("probe")
        transport = Transport.MTLS if mode == "runtime-mtls" else Transport.LINKERD
        service = Service(make_config(catalog, "probe", pki, transport=transport), build=probe_servicers)
        await service.start()
        port = service.port
    else:
        server = grpc.aio.server()
        probe_pb2_grpc.add_ProbeServiceServicer_to_server(ProbeServicer(None), server)
        if mode == "bare-mtls":
            credentials = ensure_credentials(pki, catalog, "probe")
            port = server.add_secure_port(
                "127.0.0.1:0",
                grpc.ssl_server_credentials(
                    [(credentials.private_key, credentials.certificate_chain)],
                    root_certificates=credentials.root_certificates,
                    require_client_auth=True,
                ),
            )
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    print(f"ready {port}", flush=True)
    await asyncio.Event().wait()


# --- the load generator ---------------------------------------------------------------------------------


def _client_tls(pki: Path) -> ssl.SSLContext:
    """The ops identity's client certificate, verifying the server against the dev CA, ALPN h2 as gRPC needs."""
    credentials = ensure_credentials(pki, mesh_catalog(), "ops")
    scratch = Path(tempfile.mkdtemp())
    (scratch / "chain.pem").write_bytes(credentials.certificate_chain)
    (scratch / "key.pem").write_bytes(credentials.private_key)
    context = ssl.create_default_context(cadata=credentials.root_certificates.decode())
    context.load_cert_chain(scratch / "chain.pem", scratch / "key.pem")
    context.check_hostname = False  # the server's identity is its SPIFFE URI, which ssl cannot match
    context.set_alpn_protocols(["h2"])
    return context


async def _load(pki: Path) -> None:
    """Serves the parent's commands on stdin: `connect <mode> <port>`, then `run <mode> <seconds>`."""
    tls = _client_tls(pki)
    loads: dict[str, GrpcLoad] = {}
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, mode, argument = line.split()
        if command == "connect":
            port = int(argument)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls if mode.endswith("mtls") else None
            )
            message = probe_pb2.EchoRequest(payload="x").SerializeToString()
            load = GrpcLoad(
                reader, writer, port, ECHO_PATH, message, scheme="https" if mode.endswith("mtls") else "http"
            )
            if mode == "runtime-linkerd":
                load.set_metadata((("l5d-client-id", LINKERD_OPS),))
            loads[mode] = load
            await loads[mode].run(0.5)  # warm the connection and the server's code paths
            reply: dict[str, float] = {"failures": loads[mode].failures}
        else:
            load = loads[mode]
            load.latencies.clear()
            started = time.perf_counter()
            completed = await load.run(float(argument))
            latencies = sorted(load.latencies)
            reply = {
                "completed": completed,
                "elapsed": time.perf_counter() - started,
                "failures": load.failures,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            }
        print(json.dumps(reply), flush=True)


# --- the orchestration ----------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float


def _pinned(cpu: int) -> Callable[[], None] | None:
    """Pin a child to one CPU: the servers share CPU 0, the load generator has CPU 1 to itself."""
    if (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class _Bench:
    def __init__(self, pki: Path) -> None:
        me = [sys.executable, "-m", "tests.bench.bench_runtime"]
        self.servers: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}
        for mode in MODES:
            server = subprocess.Popen(
                [*me, "_serve", mode, str(pki)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                preexec_fn=_pinned(0),
            )
            self.servers[mode] = server
            assert server.stdout is not None
            ready = server.stdout.readline().split()
            if ready[:1] != ["ready"]:
                raise RuntimeError(f"{mode} server exited with {server.wait()}")
            self.ports[mode] = int(ready[1])
            # The runtime logs one JSON line per call: send it where a real deployment's log shipper reads it.
            subprocess.Popen(["cat"], stdin=server.stdout, stdout=subprocess.DEVNULL, preexec_fn=_pinned(1))
        self.load = subprocess.Popen(
            [*me, "_load", str(pki)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(1)
        )
        for mode in MODES:
            self._command(f"connect {mode} {self.ports[mode]}")

    def _command(self, line: str) -> dict[str, float]:
        assert self.load.stdin is not None
        assert self.load.stdout is not None
        self.load.stdin.write(line + "\n")
        self.load.stdin.flush()
        reply: dict[str, float] = json.loads(self.load.stdout.readline())
        if reply["failures"]:
            raise RuntimeError(f"{line}: {reply['failures']} calls did not end with status OK")
        return reply

    def measure(self, mode: str, seconds: float) -> Sample:
        pid = self.servers[mode].pid
        cpu_before = _cpu_seconds(pid)
        reply = self._command(f"run {mode} {seconds}")
        cpu_used = _cpu_seconds(pid) - cpu_before
        return Sample(
            rps=reply["completed"] / reply["elapsed"],
            p50_ms=reply["p50_ms"],
            p99_ms=reply["p99_ms"],
            cpu_us_per_request=cpu_used / reply["completed"] * 1e6,
        )

    def close(self) -> None:
        for process in (self.load, *self.servers.values()):
            process.kill()
            process.wait()


def run(seconds: float, rounds: int) -> str:
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        bench = _Bench(Path(scratch))
        try:
            for _ in range(rounds):
                for mode in random.sample(MODES, len(MODES)):
                    samples[mode].append(bench.measure(mode, seconds))
        finally:
            bench.close()
    ratios = {
        mode: statistics.median(
            ours.rps / theirs.rps for ours, theirs in zip(samples[mode], samples[base], strict=True)
        )
        for mode, base in BASELINES.items()
    }
    lines = [
        f"no-op unary Echo, saturated server ({IN_FLIGHT} calls in flight), {seconds:g}s x {rounds} rounds "
        f"(medians), {os.cpu_count()} CPUs",
        "",
        f"{'server':<16} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>11} {'vs':>15} "
        f"{'throughput ratio':>17}",
    ]
    for mode in MODES:
        baseline = BASELINES.get(mode)
        found = samples[mode]
        lines.append(
            f"{mode:<16} {statistics.median(s.rps for s in found):>8.0f} "
            f"{statistics.median(s.p50_ms for s in found):>7.2f} {statistics.median(s.p99_ms for s in found):>7.2f} "
            f"{statistics.median(s.cpu_us_per_request for s in found):>11.0f} {baseline or '-':>15} "
            f"{f'{ratios[mode]:.1%}' if baseline else '-':>17}"
        )
    lines += [
        "",
        f"runtime (interceptor chain) costs {1 - ratios['runtime-mtls']:.1%} of throughput over mTLS, "
        f"{1 - ratios['runtime-linkerd']:.1%} behind Linkerd (target <= 15%)",
        f"mTLS on a warm channel costs {1 - ratios['bare-mtls']:.1%} of throughput (target <= 10%)",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        asyncio.run(_serve(sys.argv[2], Path(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        asyncio.run(_load(Path(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(run(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
