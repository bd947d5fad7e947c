"""benchmarks.kernel_bench: its report lands between its markers and states the 3x target's verdict."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench import replace_section
from benchmarks.kernel_bench import END, START, copy_models, render


def results(image_speedup: float) -> dict[str, object]:
    kernel = {"batch": 64, "numpy_us": 300.0, "numba_us": 100.0, "ratios": [2.9, 3.1]}
    return {
        "date": "2026-01-01 00:00 UTC",
        "machine": {"nproc": 2, "cpu": "test", "python": "3.11"},
        "versions": {"numba": "0", "numpy": "0", "threading_layer": "omp"},
        "load_average": (1.0, 2.0),
        "command": "python -m benchmarks.kernel_bench",
        "duration_s": 1.0,
        "settings": {"rounds": 2},
        "kernels": [
            {**kernel, "kernel": "image: crop", "speedup": image_speedup},
            {**kernel, "kernel": "tabular: steps", "speedup": 4.0},
            {**kernel, "kernel": "histogram", "speedup": 1.0},  # not a target
        ],
        "parallel": [
            {
                "kernel": "image: crop",
                "batch": 64,
                "serial_us": 1.0,
                "prange_us": 2.0,
                "serial_over_prange": 0.5,
                "ratios": [0.5],
            }
        ],
        "cold_start": {"empty": [3.0, 4.0], "warm": [1.5, 2.5], "plain": [1.0, 1.2]},
        "load": [],
        "load_skipped": "perf_analyzer missing",
    }


def test_section_between_markers_keeps_the_rest() -> None:
    text = "# Benchmarks\n\nother section\n"
    first = replace_section(text, render(results(3.5)), START, END)
    assert first.startswith(text.rstrip()) and first.count(START) == 1 and first.rstrip().endswith(END)
    assert "image: crop **3.5x**; tabular: steps **4.0x** (met)" in first
    assert "| empty (`NUMBA_CACHE_DIR` a new folder): compiles every kernel | 3.00, 4.00 | **3.00** | 3.50 |" in first
    assert "not measured: perf_analyzer missing" in first
    second = replace_section(first + "\nafter\n", render(results(2.0)), START, END)
    assert "(NOT met)" in second and "(met)" not in second
    assert second.startswith(text.rstrip()) and second.endswith("\nafter\n")


def test_plain_copies_drop_the_pipelines(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("imgcls", "digits"):
        (models / name / "1").mkdir(parents=True)
        (models / name / "config.pbtxt").write_text(f'name: "{name}"\n')
        (models / name / "preprocess.json").write_text("{}")
    plain = copy_models(
        models, tmp_path / "plain", ("imgcls", "digits"), config_suffix="dynamic_batching { }\n", plain=True
    )
    assert not (plain / "imgcls" / "preprocess.json").exists() and not (plain / "imgcls" / "config.pbtxt").exists()
    assert not (plain / "digits" / "preprocess.json").exists()
    assert (plain / "digits" / "config.pbtxt").read_text() == 'name: "digits"\ndynamic_batching { }\n'
