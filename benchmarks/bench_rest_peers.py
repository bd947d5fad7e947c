"""Ferry's REST API against Seldon MLServer's and KServe's Python server's (issue 16): the same ONNX files, the same
REST load generator, in the same run.

    python -m benchmarks.bench_rest_peers --models examples/models --out bench-out/rest-peers [--rounds 3] [--quick]

The peers live in their own venvs: ``bash benchmarks/mlserver/setup.sh`` (``.venv-mlserver``) and
``bash benchmarks/kserve/setup.sh`` (``.venv-kserve``).

- **Ferry**: ``ferry serve`` on a copy of ``tiny`` and ``mlp`` with ``dynamic_batching { }`` (as
  ``benchmarks.mlserver.compare`` and ``benchmarks.bench_rest``), REST on a free port, everything else default.
- **MLServer** 1.7.1: :func:`benchmarks.mlserver.compare.mlserver` with :data:`benchmarks.mlserver.config.BEST`
  (adaptive batching 16 / 1 ms, in-process model, 1 intra-op thread), and the same without batching (*MLServer
  unbatched*); its REST API is its own FastAPI app on uvicorn.
- **KServe** 0.21 Python server: :mod:`benchmarks.kserve.launch` (one uvicorn worker, ``session.run`` inline, 1
  intra-op thread, its per-request log lines off). KServe has no in-process batching.
- **Load**: closed loop, ``input`` FP32 [1, features] to ``POST /v2/models/{model}/infer``, one keep-alive
  HTTP/1.1 connection per request in flight, from :mod:`benchmarks.rest_load` (nghttp2's ``h2load``, in C: the
  default) or with ``--client aiohttp`` from :mod:`benchmarks.mlserver.drive` over REST
  (:class:`ferry.loadtest.rest.HttpClient`, in this process, several times h2load's CPU per request). V2 JSON to
  every server; Triton's binary tensor extension to Ferry and KServe as well (MLServer answers it with an error:
  the run records which). Each case's variants run back to back, their order rotating each round. Every variant's
  answer is checked against onnxruntime in this process first, so all computed the same thing from the same payload.

Writes ``OUT/rest-peers.json`` and the servers' log, prints the table, and with ``--doc FILE`` rewrites the part of
FILE between ``<!-- bench:rest-peers:start -->`` and ``<!-- bench:rest-peers:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from benchmarks import bench, rest_load
from benchmarks.bench import Running, serving
from benchmarks.mlserver import compare, drive
from benchmarks.mlserver import config as mls_config
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest.rest import body_of, infer_path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:rest-peers:start -->", "<!-- bench:rest-peers:end -->"
MODELS = compare.MODELS
CONCURRENCY = (1, 16)
VARIANTS = (
    ("ferry", "json"),
    ("ferry", "binary"),
    ("mlserver", "json"),
    ("mlserver-unbatched", "json"),
    ("kserve", "json"),
    ("kserve", "binary"),
)
"""(server, REST body) pairs measured in each case."""


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: float = 3.0
    warmup_s: float = 0.5
    rounds: int = 3
    client: str = "h2load"  # or "aiohttp": drive.py's REST client (ferry.loadtest.rest.HttpClient), in this process

    @classmethod
    def quick(cls, client: str = "h2load") -> Settings:
        return cls(duration_s=0.5, warmup_s=0.2, rounds=1, client=client)


def key(server: str, data: str) -> str:
    return f"{server}/{data}"


# --- servers --------------------------------------------------------------------------------------------------


def kserve_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{venv}: no KServe venv; make it with `bash benchmarks/kserve/setup.sh`")
    return python


@contextlib.contextmanager
def kserve(venv: Path, models: Path, log: IO[str]) -> Iterator[Running]:
    """KServe's Python server on ``MODELS`` (``benchmarks/kserve/launch.py``), REST on a free 127.0.0.1 port."""
    cmd = [str(kserve_python(venv)), str(ROOT / "benchmarks" / "kserve" / "launch.py"), "--host", "127.0.0.1",
           "--http-port", "0", "--intra-op-threads", str(mls_config.BEST.intra_op_threads)]  # fmt: skip
    for name in MODELS:
        cmd += ["--model", f"{name}={(models / name / '1' / 'model.onnx').resolve()}"]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    with (
        tempfile.TemporaryDirectory(prefix="ferry-kserve-") as tmp,
        serving("kserve", cmd, "kserve ready:", log, env=env, cwd=Path(tmp), address="http") as running,
    ):
        yield running


@contextlib.contextmanager
def ferry(models: Path, log: IO[str]) -> Iterator[Running]:
    """Ferry (the working tree) on a ``dynamic_batching`` copy of ``MODELS``, REST on a free port."""
    with tempfile.TemporaryDirectory(prefix="ferry-rest-peers-") as tmp:
        command = bench.ferry_command(compare.ferry_repository(models, Path(tmp) / "models"))
        command[command.index("--http-port") + 1] = "0"
        with serving("ferry", command, "ferry ready:", log, address="http") as running:
            yield running


# --- checks ---------------------------------------------------------------------------------------------------


def post_infer(address: str, model: str, features: int, data: str, timeout_s: float = 30) -> tuple[int, bytes]:
    """One REST infer call with the benchmark's payload: (HTTP status, body)."""
    payload, _ = drive.request_bytes(model, features)
    body, headers = body_of(pb.ModelInferRequest.FromString(payload), data == "binary")
    request = urllib.request.Request(f"http://{address}{infer_path(model, '')}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def check_answers(server: Running, data: str, models: Path, shape: dict[str, compare.Shape]) -> None:
    """Each model's REST answer to the benchmark payload equals onnxruntime's, in this process."""
    for name in MODELS:
        status, body = post_infer(server.address, name, shape[name].features, data)
        if status != 200:
            raise RuntimeError(f"{server.name} {data} {name}: HTTP {status}: {body[:300]!r}")
        got = drive.decode_rest_output(body)
        _, x = drive.request_bytes(name, shape[name].features)
        session = ort.InferenceSession(str(models / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        want = session.run(["output"], {"input": x})[0]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{server.name} {data} answered {name} with {got} where onnxruntime gives {want}")


def probe_binary(server: Running, shape: dict[str, compare.Shape]) -> dict[str, Any]:
    """What ``server`` answers to one request in Triton's binary extension (MLServer: an error, recorded)."""
    name = MODELS[-1]
    status, body = post_infer(server.address, name, shape[name].features, "binary")
    return {"status": status, "body": body[:240].decode("utf-8", "replace")}


# --- measurements ---------------------------------------------------------------------------------------------


def measure_one(server: Running, model: str, shape: compare.Shape, data: str, concurrency: int,
                settings: Settings) -> dict[str, Any]:  # fmt: skip
    """One run of the settings' client; adds the server's process-tree CPU per request (over the whole run, warm-up
    included, estimated as throughput x run time, as ``compare.measure_drive`` does)."""
    if settings.client == "aiohttp":
        return compare.measure_drive(server, model, shape, concurrency, settings.duration_s, settings.warmup_s,
                                     client=f"http-{data}")  # fmt: skip
    cpu0, t0 = compare.tree_cpu_seconds(server.pid), time.perf_counter()
    result = rest_load.run(server.address, model, shape.features, data, concurrency=concurrency,
                           duration_s=settings.duration_s, warmup_s=settings.warmup_s)  # fmt: skip
    cpu, wall = compare.tree_cpu_seconds(server.pid) - cpu0, time.perf_counter() - t0
    if result.errors:
        raise RuntimeError(f"{server.name} {data} {model} c={concurrency}: errors {result.errors}")
    return asdict(result) | {"server_cpu_us_per_request": cpu * 1e6 / max(1.0, result.infer_per_s * wall)}


def measure(servers: dict[str, Running], shape: dict[str, compare.Shape], settings: Settings,
            levels: Sequence[int], variants: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:  # fmt: skip
    """Every (model, concurrency) on every variant back to back; round r starts the order at variant r."""
    cases = []
    for model in MODELS:
        for concurrency in levels:
            runs: dict[str, list[dict[str, Any]]] = {key(*v): [] for v in variants}
            for r in range(settings.rounds):
                start = r % len(variants)
                for server, data in (*variants[start:], *variants[:start]):
                    runs[key(server, data)].append(
                        measure_one(servers[server], model, shape[model], data, concurrency, settings)
                    )
            print(f"  {model} c={concurrency}: " + ", ".join(
                f"{k} {_mean(rs, 'infer_per_s'):,.0f}/s" for k, rs in runs.items()), flush=True)  # fmt: skip
            cases.append({"model": model, "concurrency": concurrency, "runs": runs})
    return cases


# --- the report -----------------------------------------------------------------------------------------------


def _mean(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.fmean(r[field] for r in runs)


CLIENT_LABELS = {
    "h2load": "nghttp2's `h2load --h1` (C, `benchmarks/rest_load.py`)",
    "aiohttp": "`drive.py`'s aiohttp client (`ferry.loadtest.rest.HttpClient`) in the benchmark's process",
}
LABELS = {
    "ferry/json": "Ferry JSON",
    "ferry/binary": "Ferry binary",
    "mlserver/json": "MLServer JSON",
    "mlserver-unbatched/json": "MLServer unbatched JSON",
    "kserve/json": "KServe JSON",
    "kserve/binary": "KServe binary",
}
RATIOS = (
    ("Ferry ÷ MLServer (JSON)", "ferry/json", ("mlserver/json",)),
    ("Ferry ÷ best MLServer (JSON)", "ferry/json", ("mlserver/json", "mlserver-unbatched/json")),
    ("Ferry ÷ KServe (JSON)", "ferry/json", ("kserve/json",)),
    ("Ferry ÷ KServe (binary)", "ferry/binary", ("kserve/binary",)),
)
"""(column, numerator, denominators): a ratio of mean req/s, divided by the fastest of the denominators."""


def ratio(case: dict[str, Any], num: str, dens: Sequence[str]) -> tuple[float, list[float]] | None:
    """The ratio of mean req/s (over the fastest denominator) and the per-round ratios; None if one is missing."""
    runs = case["runs"]
    if num not in runs or not all(d in runs for d in dens):
        return None
    best = max(dens, key=lambda d: _mean(runs[d], "infer_per_s"))
    per_round = [n["infer_per_s"] / max(1e-9, d["infer_per_s"]) for n, d in zip(runs[num], runs[best], strict=True)]
    return _mean(runs[num], "infer_per_s") / max(1e-9, _mean(runs[best], "infer_per_s")), per_round


def render(results: dict[str, Any]) -> str:
    s, m, v = results["settings"], results["machine"], results["versions"]
    cases = results["cases"]
    keys = [k for k in LABELS if k in cases[0]["runs"]] if cases else []
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}; "
        f"{results['duration_s']:,.0f} s, 1-minute load average {results['load_average_1m']['start']:.1f} at the "
        f"start, {results['load_average_1m']['end']:.1f} at the end. MLServer {v['mlserver']['mlserver']}, KServe "
        f"{v['kserve']['kserve']} (uvicorn {v['kserve']['uvicorn']}, fastapi {v['kserve']['fastapi']}), each in its "
        f"own venv; onnxruntime {v['ferry']['onnxruntime']} everywhere.",
        "",
        f"Command: `{results['command']}`. Closed loop over REST, one keep-alive HTTP/1.1 connection per request in "
        f"flight, from {CLIENT_LABELS[s.get('client', 'aiohttp')]}, {s['warmup_s']:g} s warm-up + {s['duration_s']:g}"
        f" s window, {s['rounds']} round(s) per case, variants back to back in rotating order; answers checked "
        "against onnxruntime first.",
        "",
        "| model | c | " + " | ".join([*(f"{LABELS[k]} req/s" for k in keys), *(r[0] for r in RATIOS)]) + " |",
        "|---|---:|" + "---:|" * (len(keys) + len(RATIOS)),
    ]
    for case in cases:
        cells = [f"{_mean(case['runs'][k], 'infer_per_s'):,.0f}" for k in keys]
        for _, num, dens in RATIOS:
            got = ratio(case, num, dens)
            cells.append("n/a" if got is None else f"**{got[0]:.2f}** ({', '.join(f'{x:.2f}' for x in got[1])})")
        lines.append(f"| {case['model']} | {case['concurrency']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Latency p50 / p99 in ms, then the server's CPU per request (its process tree, µs) and the client's:",
        "",
        "| model | c | " + " | ".join(LABELS[k] for k in keys) + " |",
        "|---|---:|" + "---|" * len(keys),
    ]
    for case in cases:
        cells = [
            f"{_mean(rs, 'p50_us') / 1e3:,.2f} / {_mean(rs, 'p99_us') / 1e3:,.2f}; "
            f"{_mean(rs, 'server_cpu_us_per_request'):,.0f} / {_mean(rs, 'client_cpu_us_per_request'):,.0f} µs"
            for rs in (case["runs"][k] for k in keys)
        ]
        lines.append(f"| {case['model']} | {case['concurrency']} | " + " | ".join(cells) + " |")
    probe = results.get("mlserver_binary_probe")
    if probe:
        lines += ["", "MLServer's answer to Triton's binary extension (one `tiny` request, `Inference-Header-"
                  f"Content-Length` and raw FP32 after the JSON header): HTTP {probe['status']}, "
                  f"`{probe['body'][:160]}`."]  # fmt: skip
    lines += ["", "Target (Ferry REST >= 3x MLServer REST, JSON): " + target_line(cases) + "."]
    return "\n".join(lines)


def target_line(cases: list[dict[str, Any]]) -> str:
    parts = []
    for case in cases:
        got = ratio(case, "ferry/json", ("mlserver/json", "mlserver-unbatched/json"))
        if got is not None:
            verdict = "met" if got[0] >= 3 else "missed"
            parts.append(f"`{case['model']}` c{case['concurrency']} {got[0]:.2f} ({verdict})")
    return "; ".join(parts) + " against the faster MLServer configuration" if parts else "not measured"


# --- main -----------------------------------------------------------------------------------------------------


def versions(mlserver_venv: Path, kserve_venv: Path) -> dict[str, Any]:
    def probe(python: Path, packages: Sequence[str]) -> dict[str, str]:
        code = ("import json, importlib.metadata as m; "
                f"print(json.dumps({{p: m.version(p) for p in {tuple(packages)!r}}}))")  # fmt: skip
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return dict(json.loads(out.stdout))

    from importlib.metadata import version

    return {
        "mlserver": probe(compare.mlserver_python(mlserver_venv), ("mlserver", "uvloop", "onnxruntime", "numpy")),
        "kserve": probe(kserve_python(kserve_venv), ("kserve", "uvicorn", "fastapi", "uvloop", "onnxruntime")),
        "ferry": {p: version(p) for p in ("aiohttp", "onnxruntime", "numpy", "uvloop")},
        "h2load": _h2load_version(),
    }


def _h2load_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().removeprefix("h2load ")
    return "not installed"


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "benchmarks.bench_rest_peers", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rest_peers",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models", help="model repository")
    parser.add_argument("--out", type=Path, default=Path("bench-out/rest-peers"), help="folder for the JSON and log")
    parser.add_argument("--mlserver-venv", type=Path, default=ROOT / ".venv-mlserver")
    parser.add_argument("--kserve-venv", type=Path, default=ROOT / ".venv-kserve")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated levels")
    parser.add_argument("--rounds", type=int, help=f"rounds per case (default {Settings().rounds})")
    parser.add_argument("--duration", type=float, help=f"window per run, s (default {Settings().duration_s:g})")
    parser.add_argument("--client", choices=("h2load", "aiohttp"), default="h2load",
                        help="the REST load generator: nghttp2's h2load (C) or drive.py's aiohttp client")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short windows, one round: to see that it runs")
    parser.add_argument("--doc", type=Path, help="file whose bench:rest-peers section to rewrite (default: none)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: render a saved rest-peers.json")
    args = parser.parse_args(argv)
    if args.render:
        section = render(json.loads(args.render.read_text()))
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: servers stop in finally
        levels = sorted({int(x) for x in args.concurrency.split(",")})
        if not levels or not all(1 <= c <= 512 for c in levels):
            parser.error("--concurrency takes levels in 1..512")
        settings = Settings.quick(args.client) if args.quick else Settings(client=args.client)
        if args.rounds is not None or args.duration is not None:
            settings = Settings(args.duration or settings.duration_s, settings.warmup_s, args.rounds or settings.rounds,
                                args.client)  # fmt: skip
        if args.client == "h2load" and not (ok := rest_load.usable())[0]:
            parser.error(f"{ok[1]}; use --client aiohttp")
        if settings.rounds < 1 or not 0 < settings.duration_s <= 60:
            parser.error("--rounds must be >= 1 and --duration in (0, 60] s")
        results = run(args, argv, settings, levels)
        section = render(results)
    print(section)
    if args.doc:
        args.doc.write_text(bench.replace_section(args.doc.read_text(), section, START, END))
        print(f"bench_rest_peers: wrote {args.doc}")
    return 0


def run(args: argparse.Namespace, argv: Sequence[str], settings: Settings, levels: Sequence[int]) -> dict[str, Any]:
    models, mls_venv, ks_venv = args.models.resolve(), args.mlserver_venv.resolve(), args.kserve_venv.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.machine(),
        "command": _command(argv),
        "versions": versions(mls_venv, ks_venv),
        "settings": asdict(settings),
        "mlserver_config": mls_config.describe(mls_config.BEST),
    }
    shape = compare.shapes(models)
    unbatched = mls_config.BEST.with_(max_batch_size=1, max_batch_time=0.0)
    with (
        (args.out / "servers-rest-peers.log").open("w") as log,
        compare.mlserver(mls_venv, models, mls_config.BEST, log, address="http") as m,
        compare.mlserver(mls_venv, models, unbatched, log, address="http") as u,
        kserve(ks_venv, models, log) as k,
        ferry(models, log) as f,
    ):
        servers = {"ferry": f, "mlserver": m, "mlserver-unbatched": u, "kserve": k}
        results["mlserver_binary_probe"] = probe_binary(m, shape)
        for server, data in VARIANTS:
            check_answers(servers[server], data, models, shape)
        print("Ferry REST vs MLServer and KServe:", flush=True)
        results["cases"] = measure(servers, shape, settings, levels, VARIANTS)
    results["duration_s"] = time.perf_counter() - started
    results["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    (args.out / "rest-peers.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["VARIANTS", "check_answers", "main", "measure", "render"]

if __name__ == "__main__":
    sys.exit(main())
