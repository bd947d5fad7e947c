"""What TLS costs: the same Ferry server with TLS on and off, under the same perf_analyzer load, as same-run ratios
(TLS ÷ plaintext): ``tiny`` and ``mlp``, unary and streaming, at concurrency 1 and 16.

    python -m benchmarks.bench_tls --models examples/models --out bench-out [--quick] [--rounds 2] [--mtls]
        [--transport ferry|grpcio] [--cases tiny-unary-16,...]

perf_analyzer speaks TLS (``--ssl-grpc-*``), Ferry's load generator does not, so perf_analyzer drives both servers.
The two servers run side by side from one temporary copy of the models (``dynamic_batching { }``) and take turns,
their order rotating by round; certificates (a CA, an intermediate, the server's chain and, with ``--mtls``, a
client certificate) are made for the run by ``tests/certs.py``. Each connection's handshake happens once, before
the measurement windows, so the figures are the steady cost of encryption per call. Besides throughput, each run
reports the server's CPU time per request (its process's CPU over the run ÷ the requests its statistics counted),
the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from benchmarks import perf_analyzer
from benchmarks.bench import Running, Settings, cpu_seconds, ferry_command, machine, serving
from benchmarks.bench_batching import BATCHED, build_repository
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.certs import PKI, make_pki

CASES = tuple((model, mode, c) for model in ("tiny", "mlp") for mode in ("unary", "stream") for c in (1, 16))
WIDTH = {"tiny": 16, "mlp": 256}


def tls_flags(pki: PKI, mtls: bool) -> list[str]:
    flags = ["--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", str(pki.ca)]
    if mtls:
        flags += ["--ssl-grpc-private-key-file", str(pki.client.key), "--ssl-grpc-certificate-chain-file"]
        flags += [str(pki.client.cert)]
    return flags


def check(server: Running, model: str, credentials: grpc.ChannelCredentials | None) -> None:
    """One call, so a server that does not answer (or a TLS setup that does not work) fails fast and says so."""
    request = pb.ModelInferRequest(model_name=model, id="bench-check")
    request.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH[model]])
    request.raw_input_contents.append(np.zeros((1, WIDTH[model]), np.float32).tobytes())
    channel = (
        grpc.insecure_channel(server.address)
        if credentials is None
        else grpc.secure_channel(server.address, credentials)
    )
    with channel:
        try:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, wait_for_ready=True)
        except grpc.RpcError as err:
            raise RuntimeError(f"{server.name} at {server.address} did not answer {model}: {err}") from None
    if reply.id != "bench-check":
        raise RuntimeError(f"{server.name} answered {model} wrongly: {reply}")


def answered(server: Running, model: str, credentials: grpc.ChannelCredentials | None) -> int:
    """Requests the server has answered for ``model`` (its ModelStatistics), over its own kind of channel."""
    channel = (
        grpc.insecure_channel(server.address)
        if credentials is None
        else grpc.secure_channel(server.address, credentials)
    )
    with channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=30
        )
    return sum(v.inference_stats.success.count for v in reply.model_stats)


def run(
    server: Running,
    model: str,
    mode: str,
    concurrency: int,
    settings: Settings,
    extra: list[str],
    credentials: grpc.ChannelCredentials | None,
) -> dict[str, Any]:
    """One perf_analyzer run; also the server's CPU time per request over the whole run (warm-up included), which
    a busy machine disturbs less than throughput."""
    cpu_before, count_before = cpu_seconds(server.pid), answered(server, model, credentials)
    for attempt in range(3):  # a busy machine may call 3 windows unstable: measure again
        try:
            (step,) = perf_analyzer.run(
                server.address,
                model,
                [concurrency],
                streaming=mode == "stream",
                measurement_ms=settings.measurement_ms,
                extra=[*settings.perf_extra(), *extra],
                timeout_s=settings.perf_timeout_s(),
            )
            break
        except RuntimeError as err:
            if "stable measurement" not in str(err) or attempt == 2:
                raise
    cpu_after, requests = cpu_seconds(server.pid), answered(server, model, credentials) - count_before
    cpu_us = float("nan")
    if cpu_before is not None and cpu_after is not None and requests > 0:
        cpu_us = (cpu_after - cpu_before) * 1e6 / requests
    print(f"  {server.name:10} {model:4} {mode:6} c={concurrency:<3} {step.infer_per_s:9.1f} infer/s  "
          f"p50 {step.p50_us:7.0f} µs  p99 {step.p99_us:7.0f} µs  cpu {cpu_us:6.0f} µs/req", flush=True)  # fmt: skip
    return {"infer_per_s": step.infer_per_s, "p50_us": step.p50_us, "p99_us": step.p99_us, "cpu_us": cpu_us}


def measure(
    models: Path,
    work: Path,
    settings: Settings,
    log: IO[str],
    cases: tuple[tuple[str, str, int], ...] = CASES,
    transport: str = "ferry",
    mtls: bool = False,
) -> dict[str, Any]:
    repo = build_repository(models, work / "repo", BATCHED)
    pki = make_pki(work / "pki")
    command = [*ferry_command(repo), "--transport", transport]
    secured = [*command, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    if mtls:
        secured += ["--tls-client-ca", str(pki.ca)]
    client = (pki.client.key.read_bytes(), pki.client.cert.read_bytes()) if mtls else (None, None)
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), *client)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(serving("plaintext", command, "ferry ready:", log))
        tls = stack.enter_context(serving("tls", secured, "ferry ready:", log))
        for model in ("tiny", "mlp"):
            check(plain, model, None)
            check(tls, model, credentials)
        extra = {"plaintext": [], "tls": tls_flags(pki, mtls)}
        creds = {"plaintext": None, "tls": credentials}
        for model, mode, concurrency in cases:
            servers = [plain, tls]
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for r in range(settings.rounds):
                for server in servers[r % 2 :] + servers[: r % 2]:
                    name = server.name
                    runs[name].append(run(server, model, mode, concurrency, settings, extra[name], creds[name]))
            case: dict[str, Any] = {
                name: {k: statistics.fmean(x[k] for x in rs) for k in ("infer_per_s", "p50_us", "p99_us", "cpu_us")}
                for name, rs in runs.items()
            }
            ratios = [t["infer_per_s"] / p["infer_per_s"] for t, p in zip(runs["tls"], runs["plaintext"], strict=True)]
            case["ratio"] = case["tls"]["infer_per_s"] / case["plaintext"]["infer_per_s"]
            case["cpu_ratio"] = case["tls"]["cpu_us"] / case["plaintext"]["cpu_us"]
            case["ratio_per_round"] = ratios
            out[f"{model}-{mode}-{concurrency}"] = case
    return out


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). perf_analyzer, windows of "
        f"{s['measurement_ms']} ms x {s['trials']}, {s['rounds']} round(s), the two servers taking turns; transport "
        f"`{results['transport']}`{', mTLS' if results['mtls'] else ''}.",
        "",
        "| case | plaintext req/s | TLS req/s | TLS ÷ plaintext | per round | CPU µs/req plaintext / TLS "
        "| CPU TLS ÷ plaintext | p50 µs plaintext / TLS |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for key, c in results["runs"].items():
        per_round = ", ".join(f"{r:.2f}" for r in c["ratio_per_round"])
        lines.append(
            f"| {key} | {c['plaintext']['infer_per_s']:,.0f} | {c['tls']['infer_per_s']:,.0f} | **{c['ratio']:.2f}** "
            f"| {per_round} | {c['plaintext']['cpu_us']:,.0f} / {c['tls']['cpu_us']:,.0f} | {c['cpu_ratio']:.2f} "
            f"| {c['plaintext']['p50_us']:,.0f} / {c['tls']['p50_us']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("examples/models"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="short windows, one round: a smoke run")
    parser.add_argument("--transport", choices=("ferry", "grpcio"), default="ferry")
    parser.add_argument("--mtls", action="store_true", help="require client certificates on the TLS server")
    parser.add_argument("--cases", help="only these cases, e.g. tiny-unary-16,mlp-stream-1 (default: all)")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings(rounds=args.rounds)
    cases = CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = tuple(c for c in CASES if "-".join(map(str, c)) in wanted)
        if not cases:
            parser.error(f"no case matches {args.cases}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (args.out / "servers-tls.log").open("w") as log, tempfile.TemporaryDirectory() as work:
        runs = measure(args.models, Path(work), settings, log, cases, args.transport, args.mtls)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "python -m benchmarks.bench_tls " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"measurement_ms": settings.measurement_ms, "trials": settings.trials, "rounds": settings.rounds},
        "transport": args.transport,
        "mtls": args.mtls,
        "duration_s": time.monotonic() - started,
        "runs": runs,
    }
    (args.out / "results-tls.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
