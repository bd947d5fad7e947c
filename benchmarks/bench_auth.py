"""What authentication costs: ``tiny`` at concurrency 16 with ``--auth-config`` (a bearer token checked, a scope, a
model allow-list, on every call) as a ratio to the same server without it, measured back to back in one run.

    python -m benchmarks.bench_auth --models examples/models --out bench-out [--quick] [--rounds N]

perf_analyzer sends no metadata over gRPC (its ``-H`` is for HTTP), so Ferry's own load generator drives both
servers (``ferry loadtest --metadata 'authorization=Bearer ...'``, the wire client, closed loop), in alternating
order each round; the ratio is the mean of the per-round ratios of answers per second. Server CPU per request
(from /proc over each run, divided by the requests answered) is reported beside it: on a CPU-bound server the
throughput a feature costs, with less of the scheduling noise. The target (issue 14) is auth on ÷ off >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks.bench import ROOT, Running, cpu_seconds, ferry_command, machine, serving
from ferry.loadtest import cli as loadtest
from ferry.server.security.auth import SCOPES, hash_token

TOKEN = "bench-token"
CONCURRENCY = 16
MODEL = "tiny"


def auth_file(path: Path) -> Path:
    identity = {"name": "bench", "token_sha256": hash_token(TOKEN), "scopes": list(SCOPES), "models": [MODEL, "m*"]}
    path.write_text(json.dumps({"anonymous": {"scopes": ["health"]}, "identities": [identity]}))
    return path


def repository(models: Path, root: Path) -> Path:
    (root / MODEL / "1").mkdir(parents=True)
    shutil.copy(models / MODEL / "1" / "model.onnx", root / MODEL / "1" / "model.onnx")
    (root / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nmax_batch_size: 128\ndynamic_batching {{ }}\n')
    return root


@contextlib.contextmanager
def ferry(name: str, repo: Path, log: IO[str], *extra: str) -> Iterator[Running]:
    with serving(name, [*ferry_command(repo), *extra], "ferry ready:", log) as running:
        yield running


def run(server: Running, out: Path, duration_s: float, metadata: Sequence[str]) -> dict[str, float]:
    """One closed-loop load test step; answers/s and the server's CPU µs per answered request."""
    flags = [f"--metadata={m}" for m in metadata]
    before = cpu_seconds(server.pid)
    status = loadtest.main(["--target", server.address, "--model", MODEL, "--out", str(out), "--concurrency",
                            str(CONCURRENCY), "--duration", str(duration_s), "--warmup", "0.5", "--processes", "1",
                            "--progress", "plain", *flags])  # fmt: skip
    after = cpu_seconds(server.pid)
    if status != 0:
        raise RuntimeError(f"ferry loadtest against {server.name} failed ({status}); see {out}")
    (step,) = json.loads((out / "report.json").read_text())["steps"]
    if step["errors"]:
        raise RuntimeError(f"{server.name}: calls failed: {step['errors']}")
    result = {"infer_per_s": float(step["throughput_rps"])}
    if before is not None and after is not None and step["sent"]:
        result["cpu_us_per_request"] = (after - before) * 1e6 / step["sent"]
    print(f"  {server.name:9} {result['infer_per_s']:9.1f} infer/s", flush=True)
    return result


def measure(models: Path, work: Path, rounds: int, duration_s: float, log: IO[str]) -> dict[str, Any]:
    repo = repository(models, work / "models")
    auth = auth_file(work / "auth.json")
    token = [f"authorization=Bearer {TOKEN}"]
    runs: dict[str, list[dict[str, float]]] = {"auth-off": [], "auth-on": []}
    with ferry("auth-off", repo, log) as off, ferry("auth-on", repo, log, "--auth-config", str(auth)) as on:
        pairs = [(off, ()), (on, token)]
        for r in range(rounds):
            for server, metadata in pairs if r % 2 == 0 else pairs[::-1]:
                out = work / f"{server.name}-{r}"
                runs[server.name].append(run(server, out, duration_s, metadata))
    ratios = [b["infer_per_s"] / a["infer_per_s"] for a, b in zip(runs["auth-off"], runs["auth-on"], strict=True)]

    def mean(name: str, key: str) -> float | None:
        values = [x[key] for x in runs[name] if key in x]
        return statistics.fmean(values) if values else None

    return {
        "ratio": statistics.fmean(ratios),
        "per_round": ratios,
        **{name: {k: mean(name, k) for k in ("infer_per_s", "cpu_us_per_request")} for name in runs},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_auth")
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, order alternating (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    args = parser.parse_args(argv)
    rounds, duration = (1, 1.0) if args.quick else (args.rounds, args.duration)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work, (args.out / "servers-auth.log").open("w") as log:
        results = measure(args.models.resolve(), Path(work), rounds, duration, log)
    results.update(machine=machine(), rounds=rounds, duration_s=duration, concurrency=CONCURRENCY, model=MODEL)
    (args.out / "results-auth.json").write_text(json.dumps(results, indent=2) + "\n")
    off, on = results["auth-off"], results["auth-on"]
    cpu = ""
    if off["cpu_us_per_request"] and on["cpu_us_per_request"]:
        cpu = f"; server CPU {off['cpu_us_per_request']:.0f} -> {on['cpu_us_per_request']:.0f} µs/request"
    rounds_text = ", ".join(f"{r:.2f}" for r in results["per_round"])
    print(f"auth on / off, {MODEL} c{CONCURRENCY}: {results['ratio']:.2f} (rounds: {rounds_text}){cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
