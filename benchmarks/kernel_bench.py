"""``python -m benchmarks.kernel_bench``: the preprocessing kernels against their numpy references, cold start with an
empty and a warm Numba cache, and the share of imgcls's request latency spent preprocessing under load.

- **Kernels**: each Numba kernel and its numpy reference on the same input at batch 1, 16 and 64, timed in alternating
  rounds in this process (so drift on a shared machine hits both alike); figures are the best round, the speedup
  their ratio, with the range of per-round ratios. ``prange`` variants of the two pipelines show whether
  parallelism over batch rows pays on this machine (the served kernels are serial).
- **Cold start**: ``ferry serve`` from process start to its ready line on imgcls + digits, with ``NUMBA_CACHE_DIR``
  an empty temporary folder, then the same folder again (warm), and the same models without preprocess.json.
- **Under load**: Ferry serving imgcls with ``dynamic_batching { }`` under ``perf_analyzer`` (batch-1 requests of
  random uint8 images); Ferry's ModelStatistics give compute_input (concatenation + preprocessing, per batch) against
  the whole request (per request).

Writes ``OUT/kernels.json`` and the section of ``BENCHMARKS.md`` between ``<!-- bench:kernels:start -->`` and
``<!-- bench:kernels:end -->``; a ``--quick`` run writes no document unless given ``--doc``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from benchmarks import perf_analyzer
from benchmarks.bench import ROOT, ferry_command, ferry_stats, machine, replace_section, serving, stage_times
from benchmarks.kernel_prange import prange_cases
from ferry.kernels.hashing import hash_buckets, hash_buckets_ref, pack_strings
from ferry.kernels.image import ImageSpec, image_to_nchw, image_to_nchw_ref
from ferry.kernels.stats import empty_moments, histogram, histogram_ref, merge_moments, merge_moments_ref
from ferry.kernels.tabular import FeatureSteps, feature_map, feature_map_ref, one_hot, one_hot_ref

START, END = "<!-- bench:kernels:start -->", "<!-- bench:kernels:end -->"
BATCHES = (1, 16, 64)
CONCURRENCY = (1, 8, 32)
Call = Callable[[], object]


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int = 7
    round_s: float = 0.05  # time per kernel per round
    starts: int = 4  # cold-start rounds
    measurement_ms: int = 3000

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=3, round_s=0.01, starts=1, measurement_ms=1000)


# --- kernels ------------------------------------------------------------------------------------------------------


def cases(rows: int, rng: np.random.Generator) -> dict[str, tuple[Call, Call]]:
    """(Numba, numpy) callables of each kernel on a batch of ``rows``."""
    images = rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8)
    crop, resize = imgcls_spec(), imgcls_spec(resize=(72, 72))
    x = rng.standard_normal((rows, 64)).astype(np.float32) * 4
    x[rng.random(x.shape) < 0.1] = np.nan
    steps = tabular_steps(64)
    codes = rng.integers(-1, 11, (rows, 8))
    cards = np.full(8, 10, dtype=np.int64)
    data, offsets = pack_strings(f"category-{i}" for i in rng.integers(0, 5000, rows * 8))
    edges = np.tile(np.linspace(-8.0, 8.0, 11), (64, 1))
    state = empty_moments(64)
    return {
        "image: crop 56, normalize (imgcls)": (
            lambda: image_to_nchw(images, crop),
            lambda: image_to_nchw_ref(images, crop),
        ),
        "image: resize 64→72 bilinear, crop 56, normalize": (
            lambda: image_to_nchw(images, resize),
            lambda: image_to_nchw_ref(images, resize),
        ),
        "tabular: impute → standardize → clip, 64 features": (
            lambda: feature_map(x, steps),
            lambda: feature_map_ref(x, steps),
        ),
        "one-hot: 8 columns x 10 categories": (lambda: one_hot(codes, cards), lambda: one_hot_ref(codes, cards)),
        "hash: 8 strings a row → 2^20 buckets": (
            lambda: hash_buckets(data, offsets, 1 << 20),
            lambda: hash_buckets_ref(data, offsets, 1 << 20),
        ),
        "histogram: 64 features x 10 bins": (lambda: histogram(x, edges), lambda: histogram_ref(x, edges)),
        "moments: Welford + Chan merge, 64 features": (
            lambda: merge_moments(state, x),
            lambda: merge_moments_ref(state, x),
        ),
    }


def imgcls_spec(resize: tuple[int, int] | None = None) -> ImageSpec:
    """imgcls's preprocessing (examples/make_models.py), optionally with a resize before the crop."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return ImageSpec.build(64, 64, 3, resize=resize, crop=(56, 56), scale=1 / 255, mean=mean, std=std)


def tabular_steps(width: int) -> FeatureSteps:
    mean, std = np.linspace(-1, 1, width), np.linspace(0.5, 2, width)
    return FeatureSteps.build(
        [("impute", [mean]), ("standardize", [mean, std]), ("clip", [np.full(width, -3.0), np.full(width, 3.0)])],
        width,
    )


def time_pair(first: Call, second: Call, settings: Settings) -> tuple[float, float, list[float]]:
    """Best µs per call of each over alternating rounds, and the per-round ratios second ÷ first."""
    first(), second()  # compile, fill caches
    loops = [max(1, int(settings.round_s / max(_once(f), 1e-7))) for f in (first, second)]
    best = [float("inf"), float("inf")]
    ratios = []
    for r in range(settings.rounds):
        took = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            f = (first, second)[i]
            start = time.perf_counter()
            for _ in range(loops[i]):
                f()
            took[i] = (time.perf_counter() - start) / loops[i] * 1e6
            best[i] = min(best[i], took[i])
        ratios.append(took[1] / took[0])
    return best[0], best[1], ratios


def _once(f: Call) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def bench_kernels(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    kernels, parallel = [], []
    for rows in BATCHES:
        for name, (fast, ref) in cases(rows, rng).items():
            numba_us, numpy_us, ratios = time_pair(fast, ref, settings)
            kernels.append({"kernel": name, "batch": rows, "numba_us": numba_us, "numpy_us": numpy_us,
                            "speedup": numpy_us / numba_us, "ratios": ratios})  # fmt: skip
            print(f"  {name} b{rows}: numpy {numpy_us:,.1f} µs, numba {numba_us:,.1f} µs", flush=True)
        for name, (serial, prange) in prange_cases(rows, rng, imgcls_spec(), tabular_steps(64)).items():
            prange_us, serial_us, ratios = time_pair(prange, serial, settings)  # ratios: serial ÷ prange
            parallel.append({"kernel": name, "batch": rows, "serial_us": serial_us, "prange_us": prange_us,
                             "serial_over_prange": serial_us / prange_us, "ratios": ratios})  # fmt: skip
    return kernels, parallel


# --- servers ------------------------------------------------------------------------------------------------------


def copy_models(models: Path, root: Path, names: Sequence[str], config_suffix: str = "", plain: bool = False) -> Path:
    """Copy ``names`` from ``models`` into ``root``; ``plain`` drops preprocess.json (and imgcls's config, whose
    tensors are the client's view: without a pipeline the graph's own inputs are served)."""
    for name in names:
        shutil.copytree(models / name, root / name)
        config = root / name / "config.pbtxt"
        if plain:
            (root / name / "preprocess.json").unlink(missing_ok=True)
            if name == "imgcls":
                config.unlink()
        if config_suffix and config.exists():
            config.write_text(config.read_text() + config_suffix)
    return root


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set variables for the servers this process starts."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_to_ready(repo: Path, log: Any, cache_dir: Path) -> float:
    with environment(NUMBA_CACHE_DIR=str(cache_dir)):
        start = time.perf_counter()
        with serving("ferry", ferry_command(repo), "ferry ready:", log):
            return time.perf_counter() - start


def bench_cold_start(models: Path, settings: Settings, log: Any) -> dict[str, list[float]]:
    starts: dict[str, list[float]] = {"empty": [], "warm": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_models(models, Path(tmp) / "repo", ("imgcls", "digits"))
        plain = copy_models(models, Path(tmp) / "plain", ("imgcls", "digits"), plain=True)
        for r in range(settings.starts):
            cache = Path(tmp) / f"numba-cache-{r}"
            cache.mkdir()
            starts["empty"].append(start_to_ready(repo, log, cache))
            starts["warm"].append(start_to_ready(repo, log, cache))
            starts["plain"].append(start_to_ready(plain, log, cache))
            took = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in starts.items())
            print(f"  cold start round {r + 1}: {took}", flush=True)
    return starts


def bench_load(models: Path, settings: Settings, log: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    spec = imgcls_spec()
    rng = np.random.default_rng(1)
    extra = ["--max-trials", "3", "--stability-percentage", "999"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_models(models, Path(tmp), ("imgcls",), config_suffix="dynamic_batching { }\n")
        with serving("ferry", ferry_command(repo), "ferry ready:", log) as ferry:
            for concurrency in CONCURRENCY:
                before = ferry_stats(ferry.address, "imgcls")
                window = settings.measurement_ms
                (step,) = perf_analyzer.run(
                    ferry.address, "imgcls", [concurrency], measurement_ms=window, extra=extra, timeout_s=300
                )
                us = stage_times(before, ferry_stats(ferry.address, "imgcls"))
                if us is None:
                    continue
                batch = rng.integers(0, 256, (max(1, round(us["rows_per_execution"])), 64, 64, 3), dtype=np.uint8)
                numpy_us = min(_once(functools.partial(image_to_nchw_ref, batch, spec)) for _ in range(20)) * 1e6
                rows.append({"concurrency": concurrency, "infer_per_s": step.infer_per_s, "p50_us": step.p50_us,
                             "p99_us": step.p99_us, "client_avg_us": step.avg_us, **us,
                             "numpy_preprocess_us": numpy_us})  # fmt: skip
                print(f"  imgcls c{concurrency}: {step.infer_per_s:,.0f} infer/s, compute_input "
                      f"{us['compute_input']:.0f} of {us['success']:.0f} µs", flush=True)  # fmt: skip
    return rows


# --- report -------------------------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    targets = [k for k in results["kernels"] if k["batch"] == 64 and k["kernel"].startswith(("image", "tabular"))]
    verdict = "; ".join(f"{k['kernel']} **{k['speedup']:.1f}x**" for k in targets)
    verdict += " (met)" if all(k["speedup"] >= 3 for k in targets) else " (NOT met)"
    lines = [
        "## Preprocessing kernels",
        "",
        "`python -m benchmarks.kernel_bench` (run by `make bench` after the section above) measures the Numba kernels "
        "of `kernels/` against their numpy references, the cold start they cost, and their share of imgcls's "
        f"latency under load. Target for the image and tabular pipelines: at least 3x their numpy reference at batch "
        f"64. Measured: {verdict}.",
        "",
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, numba "
        f"{results['versions']['numba']}, numpy {results['versions']['numpy']}; other work shared the machine "
        f"(1-minute load average {results['load_average'][0]:.1f} at the start, {results['load_average'][1]:.1f} "
        "at the end).",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s).",
        "",
        f"**Kernels against their numpy references** (µs per call, best of {results['settings']['rounds']} "
        "alternating rounds in one process; speedup = numpy ÷ Numba, per-round range in brackets):",
        "",
        "| kernel | batch | numpy µs | Numba µs | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in results["kernels"]:
        lines.append(f"| {k['kernel']} | {k['batch']} | {_n(k['numpy_us'])} | {_n(k['numba_us'])} | "
                     f"**{k['speedup']:.1f}x** ({min(k['ratios']):.1f}-{max(k['ratios']):.1f}) |")  # fmt: skip
    lines += [
        "",
        "**`prange` over batch rows** (`parallel=True`, Numba's threading layer "
        f"`{results['versions']['threading_layer']}`): serial ÷ prange above 1 would mean it pays. The served "
        "kernels are serial.",
        "",
        "| kernel | batch | serial µs | prange µs | serial ÷ prange |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in results["parallel"]:
        lines.append(f"| {p['kernel']} | {p['batch']} | {_n(p['serial_us'])} | {_n(p['prange_us'])} | "
                     f"{p['serial_over_prange']:.2f} ({min(p['ratios']):.2f}-{max(p['ratios']):.2f}) |")  # fmt: skip
    s = results["cold_start"]
    lines += [
        "",
        "**Cold start**, `ferry serve` from process start to its ready line, imgcls + digits (3 versions, each "
        "pipeline warmed up before ready), seconds. Rounds run empty, warm, plain in turn; the best round is the one "
        "least disturbed by other work on the machine:",
        "",
        "| Numba cache | per round | best | mean |",
        "|---|---|---:|---:|",
    ]
    for key, label in (
        ("empty", "empty (`NUMBA_CACHE_DIR` a new folder): compiles every kernel"),
        ("warm", "warm (the same folder again): loads them"),
        ("plain", "no preprocess.json (the same models, graph inputs served)"),
    ):
        rounds = ", ".join(f"{v:.2f}" for v in s[key])
        lines.append(f"| {label} | {rounds} | **{min(s[key]):.2f}** | {statistics.mean(s[key]):.2f} |")
    lines += [
        "",
        "**Preprocessing share of imgcls's latency under load** (perf_analyzer, batch-1 requests of random uint8 "
        "images, `dynamic_batching { }`; Ferry's ModelStatistics: compute_input = concatenation + preprocessing per "
        "batch, request = per request inside Ferry; *numpy* is the reference preprocessing of a batch of the same "
        "size, timed in this process):",
        "",
        "| conc. | infer/s | p50 / p99 µs | rows/batch | request µs | compute_input µs | compute_infer µs | "
        "**share** | numpy would take µs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["load"]:
        lines.append(f"| {r['concurrency']} | {_n(r['infer_per_s'])} | {_n(r['p50_us'])} / {_n(r['p99_us'])} | "
                     f"{r['rows_per_execution']:.1f} | {_n(r['success'])} | {_n(r['compute_input'])} | "
                     f"{_n(r['compute_infer'])} | **{r['compute_input'] / r['success']:.0%}** | "
                     f"{_n(r['numpy_preprocess_us'])} |")  # fmt: skip
    if not results["load"]:
        lines.append(f"| not measured: {results.get('load_skipped', 'perf_analyzer unusable')} | | | | | | | | |")
    return "\n".join(lines)


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models", help="model repository")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for kernels.json and logs")
    parser.add_argument("--quick", action="store_true", help="few rounds, short windows: a smoke run")
    parser.add_argument("--doc", type=Path, help="file whose bench:kernels section to rewrite "
                        "(default BENCHMARKS.md; a --quick run writes none unless given)")  # fmt: skip
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    doc = args.doc or (None if args.quick else ROOT / "BENCHMARKS.md")
    models = args.models.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    print("kernels:", flush=True)
    kernels, parallel = bench_kernels(settings)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": {"numba": numba.__version__, "numpy": np.__version__, "threading_layer": numba.threading_layer()},
        "command": shlex_command(argv),
        "settings": {"rounds": settings.rounds, "round_s": settings.round_s, "starts": settings.starts},
        "kernels": kernels,
        "parallel": parallel,
    }
    with (args.out / "kernel-servers.log").open("w") as log:
        print("cold start:", flush=True)
        results["cold_start"] = bench_cold_start(models, settings, log)
        ok, why = perf_analyzer.usable()
        print("imgcls under load:", flush=True)
        results["load"] = bench_load(models, settings, log) if ok else []
        results["load_skipped"] = why
    results["duration_s"] = time.perf_counter() - started
    results["load_average"] = (load_start, os.getloadavg()[0])
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    section = render(results)
    print(section)
    if doc is not None:
        doc.write_text(replace_section(doc.read_text() if doc.exists() else "", section, START, END))
        print(f"kernel_bench: wrote {args.out / 'kernels.json'} and {doc}")
    return 0


def shlex_command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return " ".join([str(python), "-m", "benchmarks.kernel_bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
