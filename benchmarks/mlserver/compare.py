"""Ferry against Seldon MLServer serving the same ONNX files, same load generator, same run: the ratio issue 3 asks.

    python -m benchmarks.mlserver.compare --models examples/models --out bench-out [--sweep] [--quick]

- **MLServer** 1.x in its own venv (``bash benchmarks/mlserver/setup.sh`` makes ``.venv-mlserver/``), serving
  ``mlp`` and ``tiny`` through :mod:`benchmarks.mlserver.onnx_runtime` with adaptive batching on, started by
  :mod:`benchmarks.mlserver.launch` (which adds the ``ModelConfig`` RPC perf_analyzer needs, in-process). Its
  settings are :data:`benchmarks.mlserver.config.BEST`; ``--sweep`` first measures the configurations in
  ``config.SWEEP_*`` and keeps the best one for the comparison.
- **Ferry** (``ferry serve``) on a temporary copy of the same two models with ``dynamic_batching { }`` added to
  their config.pbtxt (its batching on, with its defaults), everything else at its defaults.
- **Load**: :mod:`benchmarks.mlserver.drive` (closed loop, unary ``ModelInfer``, pre-serialized raw FP32 input
  [1, features]) at each concurrency, the servers back to back, their order reversing each round: MLServer with
  adaptive batching, the same MLServer configuration without it (a reference, on its own ports at the same time:
  on this machine MLServer's batcher can cost more than it saves), and Ferry; then Triton's perf_analyzer on
  MLServer (batching) and Ferry as a cross-check (``--no-perf-analyzer`` skips it). Every server's first answers
  are checked against onnxruntime in this process, so all computed the same thing from the same payload.

Servers listen on 127.0.0.1 (free ports) only and are always stopped (terminate, wait, then kill their process
group). Writes ``OUT/mlserver-compare.json``, the servers' logs, and the section of ``BENCHMARKS.md`` between
``<!-- bench:mlserver:start -->`` and ``<!-- bench:mlserver:end -->`` (a ``--quick`` run writes none unless given
``--doc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from benchmarks import bench, perf_analyzer
from benchmarks.bench import Running, serving
from benchmarks.mlserver import config as mls_config
from benchmarks.mlserver import drive

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
START, END = "<!-- bench:mlserver:start -->", "<!-- bench:mlserver:end -->"
MODELS = ("mlp", "tiny")
CONCURRENCY = (1, 8, 32, 64)


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: float = 5.0
    warmup_s: float = 1.0
    rounds: int = 2
    perf_ms: int = 2000
    perf_trials: int = 3
    sweep_concurrency: int = 64
    sweep_duration_s: float = 3.0
    sweep_passes: int = 3

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            duration_s=1.0, warmup_s=0.5, rounds=1, perf_ms=500, perf_trials=3, sweep_duration_s=1.0, sweep_passes=1
        )


# --- servers --------------------------------------------------------------------------------------------------


def mlserver_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{venv}: no MLServer venv; make it with `bash benchmarks/mlserver/setup.sh`")
    return python


@contextlib.contextmanager
def mlserver(venv: Path, models: Path, config: mls_config.MLServerConfig, log: IO[str],
             address: str = "grpc") -> Iterator[Running]:  # fmt: skip
    """MLServer serving ``MODELS`` from ``models`` with ``config``, on free 127.0.0.1 ports; the ``Running``'s address
    is its gRPC one (``address="http"``: its REST one)."""
    with tempfile.TemporaryDirectory(prefix="ferry-mlserver-") as tmp:
        folder = mls_config.write_folder(models, MODELS, Path(tmp) / "settings", config)
        configs = Path(tmp) / "model-configs.json"
        configs.write_text(json.dumps(mls_config.model_configs(models, MODELS)))
        env = {**os.environ, "PYTHONPATH": str(folder)}
        env.pop("VIRTUAL_ENV", None)
        cmd = [str(mlserver_python(venv)), str(HERE / "launch.py"), str(folder), "--host", "127.0.0.1",
               "--model-configs", str(configs)]  # fmt: skip
        with serving("mlserver", cmd, "mlserver ready:", log, env=env, cwd=Path(tmp), address=address) as running:
            yield running


@contextlib.contextmanager
def ferry(models: Path, log: IO[str], ref: str | None = None) -> Iterator[Running]:
    """Ferry on a temporary copy of ``MODELS`` with ``dynamic_batching { }`` added to each config.pbtxt; the
    working tree's Ferry, or with ``ref`` the server/client/kernels packages of that commit (``git archive``), so a
    colleague's half-finished edit in the shared tree cannot break or skew the run."""
    with tempfile.TemporaryDirectory(prefix="ferry-batching-") as tmp:
        repo = ferry_repository(models, Path(tmp) / "models")
        source = ROOT
        if ref is not None:
            source = Path(tmp) / "src"
            source.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "server", "client", "kernels"],
                                     capture_output=True, check=True, timeout=60)  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True, timeout=60)
        with serving("ferry", bench.ferry_command(repo), "ferry ready:", log, cwd=source) as running:
            yield running


def git_commit(ref: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    return out.stdout.strip() or ref


def ferry_repository(models: Path, into: Path) -> Path:
    return bench.batched_copy(models, into, MODELS)


# --- measurements ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    features: int
    outputs: int


def shapes(models: Path) -> dict[str, Shape]:
    out = {}
    for name in MODELS:
        config = mls_config._read_config(models / name / "config.pbtxt", name)
        out[name] = Shape(features=math.prod(config.input[0].dims), outputs=math.prod(config.output[0].dims))
    return out


def check_answers(server: Running, models: Path, shape: dict[str, Shape]) -> None:
    """Each model's answer to the benchmark payload equals onnxruntime's, in this process: same work on both."""
    for name in MODELS:
        payload, data = drive.request_bytes(name, shape[name].features)
        got = drive.decode_output(_run(drive.infer_once(server.address, payload, timeout_s=30)))
        session = ort.InferenceSession(str(models / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        want = session.run(["output"], {"input": data})[0]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{server.name} answered {name} with {got} where onnxruntime gives {want}")


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live descendants (MLServer's parallel workers), Linux /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += bench.cpu_seconds(p) or 0.0
        todo.extend(children.get(p, []))
    return total


def measure_drive(server: Running, model: str, shape: Shape, concurrency: int, duration_s: float,
                  warmup_s: float, client: str = "wire") -> dict[str, Any]:  # fmt: skip
    cpu0, t0 = tree_cpu_seconds(server.pid), time.perf_counter()
    result = drive.run(server.address, model, shape.features, concurrency=concurrency, duration_s=duration_s,
                       warmup_s=warmup_s, client=client, expect_shape=(1, shape.outputs))  # fmt: skip
    cpu, wall = tree_cpu_seconds(server.pid) - cpu0, time.perf_counter() - t0
    out = asdict(result)
    # the server's CPU over the whole run (warm-up included) per request, estimated as throughput x run time
    out["server_cpu_us_per_request"] = cpu * 1e6 / max(1.0, result.infer_per_s * wall)
    if result.errors:
        raise RuntimeError(f"{server.name} {model} c={concurrency}: errors {result.errors}")
    return out


def measure_perf(server: Running, model: str, concurrency: int, settings: Settings) -> dict[str, Any]:
    extra = ["--max-trials", str(settings.perf_trials), "--stability-percentage", "999"]
    timeout = 60 + 4 * settings.perf_trials * settings.perf_ms / 1000
    (step,) = perf_analyzer.run(server.address, model, [concurrency], measurement_ms=settings.perf_ms, extra=extra,
                                timeout_s=timeout)  # fmt: skip
    return asdict(step)


PERF_SERVERS = ("mlserver", "ferry")


def compare(servers: dict[str, Running], shape: dict[str, Shape], settings: Settings, levels: Sequence[int],
            with_perf: bool) -> dict[str, Any]:  # fmt: skip
    """Every (model, concurrency) on every server back to back; the order reverses with each round. perf_analyzer
    cross-checks MLServer (batching) and Ferry only, to keep the run short."""
    names = tuple(servers)
    cases: list[dict[str, Any]] = []
    flip = 0
    for model in MODELS:
        for concurrency in levels:
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for _ in range(settings.rounds):
                for name in names[::-1] if flip % 2 else names:
                    runs[name].append(measure_drive(servers[name], model, shape[model], concurrency,
                                                    settings.duration_s, settings.warmup_s))  # fmt: skip
                flip += 1
            case: dict[str, Any] = {"model": model, "concurrency": concurrency, "drive": runs}
            means = ", ".join(f"{n} {_mean(runs[n], 'infer_per_s'):,.0f}/s" for n in names)
            print(f"  {model} c={concurrency}: {means}", flush=True)
            cases.append(case)
    if with_perf:
        for case in cases:
            perf: dict[str, dict[str, Any]] = {}
            for name in PERF_SERVERS[::-1] if flip % 2 else PERF_SERVERS:
                perf[name] = measure_perf(servers[name], case["model"], case["concurrency"], settings)
            flip += 1
            case["perf_analyzer"] = perf
            print(f"  perf_analyzer {case['model']} c={case['concurrency']}: " + ", ".join(
                f"{n} {perf[n]['infer_per_s']:,.0f}/s" for n in PERF_SERVERS), flush=True)  # fmt: skip
    return {"cases": cases}


def sweep(venv: Path, models: Path, shape: dict[str, Shape], settings: Settings, log: IO[str]) -> dict[str, Any]:
    """MLServer alone at ``sweep_concurrency`` under each configuration; the best wins. Score: the geometric mean of
    mlp's and tiny's requests/s, each averaged over ``sweep_passes`` passes. All configurations of a stage run at
    once (idle ones cost nothing) and each pass measures them one after another, every other pass in reverse
    order, so the drift of a shared machine spreads over all of them instead of favouring whichever ran in a quiet
    minute. Stage 1 varies the batching knobs (the best with batching on wins; without is measured for reference),
    stage 2 the server knobs on stage 1's winner."""
    tried: dict[tuple[int, mls_config.MLServerConfig], dict[str, list[float]]] = {}

    def score(key: tuple[int, mls_config.MLServerConfig]) -> float:
        per_model = [statistics.fmean(x) for x in tried[key].values()]
        return math.prod(per_model) ** (1 / len(per_model))

    def stage(number: int, configs: list[mls_config.MLServerConfig]) -> mls_config.MLServerConfig:
        """Measure ``configs`` side by side; return the best with batching on (scored on this stage's passes)."""
        configs = list(dict.fromkeys(configs))  # an override equal to the base is measured once
        with contextlib.ExitStack() as stack:
            running = {c: stack.enter_context(mlserver(venv, models, c, log)) for c in configs}
            for server in running.values():
                check_answers(server, models, shape)
            for p in range(settings.sweep_passes):
                for config in configs[::-1] if p % 2 else configs:
                    results = tried.setdefault((number, config), {m: [] for m in MODELS})
                    for model in MODELS:
                        r = measure_drive(running[config], model, shape[model], settings.sweep_concurrency,
                                          settings.sweep_duration_s, settings.warmup_s)  # fmt: skip
                        results[model].append(r["infer_per_s"])
                    print(f"  sweep stage {number} pass {p + 1} {config.label()}: "
                          + ", ".join(f"{m} {x[-1]:,.0f}/s" for m, x in results.items()), flush=True)  # fmt: skip
        return max((c for c in configs if c.batching), key=lambda c: score((number, c)))

    # MLServer without batching is measured for reference; the issue compares with adaptive batching on.
    best1 = stage(1, [mls_config.BEST.with_(**o) for o in mls_config.SWEEP_BATCHING])
    best = stage(2, [best1, *(best1.with_(**o) for o in mls_config.SWEEP_SERVER)])
    rows = [
        {
            "stage": number,
            "config": mls_config.describe(config),
            "score": score((number, config)),
            "models": {m: {"infer_per_s": statistics.fmean(x), "passes": x} for m, x in runs.items()},
        }
        for (number, config), runs in tried.items()
    ]
    return {"concurrency": settings.sweep_concurrency, "duration_s": settings.sweep_duration_s,
            "passes": settings.sweep_passes, "tried": rows, "best": mls_config.describe(best),
            "best_config": best}  # fmt: skip


# --- the report -----------------------------------------------------------------------------------------------


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def _ms(us: float) -> str:
    return f"{us / 1e3:,.1f}" if us < 100_000 else f"{us / 1e3:,.0f}"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    cfg = results["mlserver_config"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}. "
        f"MLServer {v['mlserver']['mlserver']} in its own venv (`bash benchmarks/mlserver/setup.sh`: "
        + ", ".join(f"{k} {x}" for k, x in v["mlserver"].items() if k != "mlserver")
        + "); Ferry's venv: "
        + ", ".join(f"{k} {x}" for k, x in v["ferry"].items())
        + ".",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s; 1-minute load average "
        f"{results['load_average_1m']['start']:.1f} at the start, {results['load_average_1m']['end']:.1f} at the end; "
        "other work shared the machine, so read the ratios, which pair figures measured seconds apart).",
        "",
        f"- **Ferry** ({results.get('ferry_source', 'working tree')}): `ferry serve --model-repository COPY "
        "--host 127.0.0.1 --grpc-port 0 --http-port -1 --log-level WARNING`, where COPY holds `mlp` and `tiny` "
        "from `examples/models` with `dynamic_batching { }` appended to their config.pbtxt (Ferry's batching with "
        "its defaults; `max_batch_size: 128` from the example config); every other setting at Ferry's defaults.",
        f"- **MLServer**: {cfg['label']} "
        f"({'chosen by `--sweep` in this run' if results.get('sweep') else 'the best of the last `--sweep`, below'}). "
        f"`settings.json`: `debug: {str(cfg['debug']).lower()}`, `parallel_workers: {cfg['parallel_workers']}`, "
        f"`metrics_endpoint: {'/metrics' if cfg['metrics'] else 'null'}`; each `model-settings.json`: "
        f"`implementation: onnx_runtime.OnnxRuntime` (`benchmarks/mlserver/onnx_runtime.py`: NumpyCodec decode, "
        f"`session.run` inline, NumpyCodec encode, intra-op threads = "
        f"{cfg['intra_op_threads'] or 'cores'}, no spinning), `max_batch_size: {cfg['max_batch_size']}`, "
        f"`max_batch_time: {cfg['max_batch_time']}`, inputs/outputs metadata from config.pbtxt. Started by "
        "`benchmarks/mlserver/launch.py` (= `mlserver start`, plus an in-process `ModelConfig` handler for "
        "perf_analyzer; `ModelInfer` takes MLServer's own path).",
        "- **Load**: `benchmarks/mlserver/drive.py`, closed loop, unary `ModelInfer`, input `input` FP32 "
        f"[1, features] as `raw_input_contents` (MLServer 1.x accepts raw contents and answers raw), one connection "
        "(`ferry.loadtest.wire`: gRPC written onto HTTP/2, about half grpc.aio's client CPU per call), "
        f"{s['warmup_s']:g} s warm-up + {s['duration_s']:g} s window, {s['rounds']} round(s) per case, the "
        "servers back to back, their order reversing each round; every server's answers checked against onnxruntime "
        "first. *MLServer unbatched* is the same MLServer configuration with `max_batch_size: 0`, running at the "
        "same time (on its own ports) as a reference: *Ferry ÷ best MLServer* divides by the faster of the two. "
        "*Server CPU* is the server's process tree CPU time per request over the run.",
        "",
        "| model | conc. | MLServer req/s | MLServer unbatched req/s | Ferry req/s | Ferry ÷ MLServer (per round) "
        "| Ferry ÷ best MLServer | MLServer p50 / p99 ms | Ferry p50 / p99 ms | server CPU µs/req MLServer / Ferry |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peak: dict[str, dict[str, float]] = {}
    for case in results["cases"]:
        d = case["drive"]
        mr, fr = d["mlserver"], d["ferry"]
        ur = d.get("mlserver-unbatched", mr)
        mt, ut, ft = _mean(mr, "infer_per_s"), _mean(ur, "infer_per_s"), _mean(fr, "infer_per_s")
        rounds = ", ".join(f"{f['infer_per_s'] / m_['infer_per_s']:.2f}" for m_, f in zip(mr, fr, strict=True))
        p = peak.setdefault(case["model"], {"mlserver": 0.0, "mlserver-unbatched": 0.0, "ferry": 0.0})
        for key, value in (("mlserver", mt), ("mlserver-unbatched", ut), ("ferry", ft)):
            p[key] = max(p[key], value)
        lines.append(
            f"| {case['model']} | {case['concurrency']} | {mt:,.0f} | {ut:,.0f} | {ft:,.0f} | **{ft / mt:.2f}** "
            f"({rounds}) | {ft / max(mt, ut):.2f} "
            f"| {_ms(_mean(mr, 'p50_us'))} / {_ms(_mean(mr, 'p99_us'))} "
            f"| {_ms(_mean(fr, 'p50_us'))} / {_ms(_mean(fr, 'p99_us'))} "
            f"| {_mean(mr, 'server_cpu_us_per_request'):,.0f} / {_mean(fr, 'server_cpu_us_per_request'):,.0f} |"
        )
    lines += [
        "",
        "Best throughput over the concurrency levels (target ≥ 3 against MLServer with adaptive batching):",
        "",
    ]
    for model, p in peak.items():
        ratio = p["ferry"] / p["mlserver"]
        lines.append(
            f"- `{model}`: Ferry {p['ferry']:,.0f} ÷ MLServer {p['mlserver']:,.0f} req/s = **{ratio:.2f}** "
            f"({'met' if ratio >= 3 else 'not met'}); ÷ MLServer unbatched {p['mlserver-unbatched']:,.0f} req/s = "
            f"{p['ferry'] / p['mlserver-unbatched']:.2f}."
        )
    lines += ["", *_observations(results)]
    if any("perf_analyzer" in c for c in results["cases"]):
        lines += [
            "",
            f"**Cross-check with perf_analyzer** {results['versions'].get('perf_analyzer', '')} (gRPC, batch 1, random "
            f"input, `--measurement-interval {s['perf_ms']} --max-trials {s['perf_trials']} --stability-percentage "
            "999`, one run per server, order alternating; against MLServer through the launch.py ModelConfig handler):",
            "",
            "| model | conc. | MLServer infer/s | Ferry infer/s | Ferry ÷ MLServer | MLServer p50 / p99 ms "
            "| Ferry p50 / p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for case in results["cases"]:
            if "perf_analyzer" not in case:
                continue
            pm, pf = case["perf_analyzer"]["mlserver"], case["perf_analyzer"]["ferry"]
            lines.append(
                f"| {case['model']} | {case['concurrency']} | {pm['infer_per_s']:,.0f} | {pf['infer_per_s']:,.0f} "
                f"| **{pf['infer_per_s'] / pm['infer_per_s']:.2f}** | {_ms(pm['p50_us'])} / {_ms(pm['p99_us'])} "
                f"| {_ms(pf['p50_us'])} / {_ms(pf['p99_us'])} |"
            )
    sw = results.get("sweep") or results.get("last_sweep")
    if sw:
        lines += [
            "",
            f"**MLServer configurations** (`--sweep`{'' if results.get('sweep') else ', from ' + sw['date']}): "
            f"MLServer alone, drive.py at concurrency {sw['concurrency']}, {sw['duration_s']:g} s per model; "
            f"each model's req/s the mean of {sw.get('passes', 1)} passes (per pass in brackets); score = their "
            "geometric mean. All configurations of a stage ran at once and each pass measured them one after "
            "another, every other pass in reverse order. Stage 1 varies the batching (best with batching on wins), "
            "stage 2 the server knobs on stage 1's best, measured again beside them (each stage scored on its own "
            "passes). A shared machine: differences under ~15% are noise.",
            "",
            "| stage | MLServer configuration | mlp req/s | tiny req/s | score |",
            "|---:|---|---:|---:|---:|",
        ]
        for t in sw["tried"]:
            mark = "**" if t["config"]["label"] == sw["best"]["label"] and t.get("stage", 2) == 2 else ""
            cells = []
            for m in MODELS:
                passes = ", ".join(f"{x:,.0f}" for x in t["models"][m].get("passes", []))
                cells.append(f"{t['models'][m]['infer_per_s']:,.0f} ({passes})")
            label = f"{mark}{t['config']['label']}{mark}"
            lines.append(f"| {t.get('stage', '')} | {label} | {' | '.join(cells)} | {t['score']:,.0f} |")
    return "\n".join(lines)


def _observations(results: dict[str, Any]) -> list[str]:
    """Plain facts read off this run's numbers, so that the section explains itself after every rerun."""
    cases = [c for c in results["cases"] if "mlserver-unbatched" in c["drive"]]
    out = []
    if cases:
        slower = sum(_mean(c["drive"]["mlserver"], "infer_per_s") < _mean(c["drive"]["mlserver-unbatched"],
                                                                         "infer_per_s") for c in cases)  # fmt: skip
        out.append(f"- MLServer's adaptive batching was slower than the same server without it at {slower} of "
                   f"{len(cases)} (model, concurrency) points of this run.")  # fmt: skip
    client = [r["client_cpu_us_per_request"] for c in results["cases"] for runs in c["drive"].values() for r in runs]
    if client:
        out.append(f"- drive.py itself used {statistics.fmean(client):,.0f} µs of CPU per request (mean over all "
                   "runs) on the same two cores: Python gRPC's client cost caps both servers and compresses the "
                   "ratios; perf_analyzer's C++ client, below, costs less.")  # fmt: skip
    sw = results.get("sweep")
    if sw and "duration_s_total" in sw:
        out.append(f"- The `--sweep` took {sw['duration_s_total']:,.0f} s of the run.")
    return out


# --- main -----------------------------------------------------------------------------------------------------


def versions(venv: Path) -> dict[str, Any]:
    probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
             "('mlserver', 'uvloop', 'onnxruntime', 'numpy', 'grpcio', 'protobuf')}))")  # fmt: skip
    out = subprocess.run([str(mlserver_python(venv)), "-c", probe], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    from importlib.metadata import version

    ferry_side = {p: version(p) for p in ("onnxruntime", "numpy", "grpcio", "protobuf", "uvloop")}
    return {"mlserver": json.loads(out.stdout), "ferry": ferry_side}


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "benchmarks.mlserver.compare", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlserver.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models", help="model repository")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the JSON and logs")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-mlserver", help="MLServer's venv")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated levels")
    parser.add_argument("--sweep", action="store_true", help="measure MLServer's configurations first, keep the best")
    parser.add_argument("--ferry-ref", help="run Ferry's server/client/kernels as of this git commit (default: the "
                        "working tree)")  # fmt: skip
    parser.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer cross-check")
    parser.add_argument("--quick", action="store_true", help="short windows, one round: a smoke run")
    parser.add_argument("--doc", type=Path, help="file whose bench:mlserver section to rewrite "
                        "(default BENCHMARKS.md; a --quick run writes none unless given)")  # fmt: skip
    parser.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: rewrite the section from a "
                        "saved mlserver-compare.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render:
        section = render(json.loads(args.render.read_text()))
        print(section)
        if args.doc or not args.quick:
            doc = args.doc or ROOT / "BENCHMARKS.md"
            doc.write_text(bench.replace_section(doc.read_text() if doc.exists() else "", section, START, END))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the servers' `finally` blocks stop them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    levels = sorted({int(x) for x in args.concurrency.split(",")})
    if not levels or not all(1 <= c <= 1024 for c in levels):
        parser.error("--concurrency takes levels in 1..1024")
    settings = Settings.quick() if args.quick else Settings()
    with_perf = not args.no_perf_analyzer
    if with_perf and not (ok_why := perf_analyzer.usable())[0]:
        print(f"compare: {ok_why[1]}; measuring without perf_analyzer", file=sys.stderr)
        with_perf = False
    doc = args.doc or (None if args.quick else ROOT / "BENCHMARKS.md")
    models, venv = args.models.resolve(), args.venv.resolve()
    mlserver_python(venv)
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.machine(),
        "command": _command(argv),
        "versions": versions(venv),
        "settings": asdict(settings),
    }
    if with_perf:
        results["versions"]["perf_analyzer"] = bench._perf_analyzer_version()
    shape = shapes(models)
    config = mls_config.BEST
    with (args.out / "mlserver-servers.log").open("w") as log:
        if args.sweep:
            print("MLServer configurations:", flush=True)
            swept = time.perf_counter()
            found = sweep(venv, models, shape, settings, log)
            found["duration_s_total"] = time.perf_counter() - swept
            config = found.pop("best_config")
            found["date"] = results["date"]
            results["sweep"] = found
        else:
            with contextlib.suppress(OSError, ValueError, KeyError):
                results["last_sweep"] = json.loads((args.out / "mlserver-sweep.json").read_text())
        results["mlserver_config"] = mls_config.describe(config)
        print(f"Ferry vs MLServer ({config.label()}):", flush=True)
        results["ferry_source"] = f"commit {git_commit(args.ferry_ref)}" if args.ferry_ref else "working tree"
        unbatched = config.with_(max_batch_size=1, max_batch_time=0.0)
        results["mlserver_unbatched_config"] = mls_config.describe(unbatched)
        with (
            mlserver(venv, models, config, log) as m,
            mlserver(venv, models, unbatched, log) as u,
            ferry(models, log, args.ferry_ref) as f,
        ):
            servers = {"mlserver": m, "mlserver-unbatched": u, "ferry": f}
            for server in servers.values():
                check_answers(server, models, shape)
            results.update(compare(servers, shape, settings, levels, with_perf))
    results["duration_s"] = time.perf_counter() - started
    results["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    (args.out / "mlserver-compare.json").write_text(json.dumps(results, indent=2) + "\n")
    if "sweep" in results:
        (args.out / "mlserver-sweep.json").write_text(json.dumps(results["sweep"], indent=2) + "\n")
    section = render(results)
    print(section)
    if doc is not None:
        doc.write_text(bench.replace_section(doc.read_text() if doc.exists() else "", section, START, END))
        print(f"compare: wrote {args.out / 'mlserver-compare.json'} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
