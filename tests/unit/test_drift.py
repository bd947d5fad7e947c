"""Drift detection: PSI and KS against hand-computed values, the reference file, the rolling window, and the
monitor on the real digits data (held-out rows stay under the threshold; shifted or noised rows cross it once)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from ferry.server.observability.drift import (
    CHUNKS,
    REFERENCE_FILE,
    DriftAlert,
    DriftMonitor,
    DriftReference,
    feature_histogram,
    ks_statistic,
    population_stability_index,
    reference_path,
)

# -- the statistics -----------------------------------------------------------------------------------------------


def test_psi_by_hand() -> None:
    reference, live = np.array([[50, 30, 20]]), np.array([[30, 30, 40]])
    # proportions e = .5 .3 .2, a = .3 .3 .4
    expected = (0.3 - 0.5) * math.log(0.3 / 0.5) + 0.0 + (0.4 - 0.2) * math.log(0.4 / 0.2)
    assert population_stability_index(reference, live) == pytest.approx([expected])
    assert expected == pytest.approx(0.2408, abs=1e-4)


def test_psi_floors_empty_bins_at_epsilon() -> None:
    reference, live = np.array([[100, 0]]), np.array([[50, 50]])
    eps = 1e-4
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - eps) * math.log(0.5 / eps)
    assert population_stability_index(reference, live, epsilon=eps) == pytest.approx([expected])


def test_psi_is_zero_for_the_same_distribution_and_per_feature() -> None:
    reference = np.array([[10, 20, 70], [5, 5, 0]])
    live = reference * 3  # same proportions, more rows
    assert population_stability_index(reference, live) == pytest.approx([0.0, 0.0])
    no_data = np.array([[0, 0]])
    assert population_stability_index(np.array([[1, 1]]), no_data) == pytest.approx([0.0])
    assert ks_statistic(np.array([[1, 1]]), no_data) == pytest.approx([0.0])


def test_ks_by_hand() -> None:
    reference = np.array([[50, 30, 20], [1, 0, 0], [2, 2, 2]])
    live = np.array([[30, 30, 40], [0, 0, 7], [2, 2, 2]])
    # cumulative .5 .8 1 vs .3 .6 1 -> .2; all mass in the first vs the last bin -> 1; the same -> 0
    assert ks_statistic(reference, live) == pytest.approx([0.2, 1.0, 0.0])


# -- the reference ------------------------------------------------------------------------------------------------


def test_reference_from_training_rows() -> None:
    x = np.array([[0.0, 5.0], [10.0, 5.0], [4.0, 5.0], [6.0, 5.0]], np.float32)
    ref = DriftReference.from_training(x, bins=5)
    assert ref.features == 2 and ref.rows == 4
    np.testing.assert_allclose(ref.edges[0], [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(ref.edges[1], [5, 5.2, 5.4, 5.6, 5.8, 6])  # constant feature: [value, value + 1]
    # columns: below, 5 bins, above; the training extremes fall inside (the last bin is closed)
    assert ref.counts.tolist() == [[0, 1, 0, 1, 1, 1, 0], [0, 4, 0, 0, 0, 0, 0]]
    np.testing.assert_allclose(ref.mean, x.mean(axis=0))
    np.testing.assert_allclose(ref.var, x.var(axis=0))


def test_values_outside_the_training_range_have_their_own_columns() -> None:
    edges = np.array([[0.0, 1.0, 2.0]])
    counts = feature_histogram(np.array([[-1.0], [0.0], [1.5], [2.0], [3.0], [np.nan]], np.float32), edges)
    assert counts.tolist() == [[1, 1, 2, 1]]  # NaN is not counted


def test_reference_file_round_trip(tmp_path: Path) -> None:
    ref = DriftReference.from_training(np.random.default_rng(0).normal(size=(200, 3)))
    path = tmp_path / REFERENCE_FILE
    path.write_bytes(ref.to_bytes())
    loaded = DriftReference.load(path)
    for name in ("edges", "counts", "mean", "var"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(ref, name))
    assert loaded.rows == 200


@pytest.mark.parametrize(
    ("changes", "drop", "message"),
    [
        ({}, ["counts", "mean"], "not a drift reference, it lacks ['counts', 'mean']"),
        ({"format": 99}, [], "drift reference format 99, this server reads 1"),
        ({"edges": np.array([[0.0, 1.0, 1.0]])}, [], "strictly increasing per feature"),
        ({"counts": np.zeros((1, 3), np.int64)}, [], "counts must be [1, 4] (>= 0) and mean, var [1]"),
    ],
)
def test_bad_reference_files_are_rejected(
    tmp_path: Path, changes: dict[str, object], drop: list[str], message: str
) -> None:
    good = {
        "format": 1,
        "edges": np.array([[0.0, 1.0, 2.0]]),
        "counts": np.zeros((1, 4), np.int64),
        "mean": np.zeros(1),
        "var": np.zeros(1),
        "rows": 0,
    }
    bad = {key: value for key, value in {**good, **changes}.items() if key not in drop}
    path = tmp_path / "ref.npz"
    np.savez(path, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as caught:
        DriftReference.load(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_reference_path_prefers_the_version_directory(tmp_path: Path) -> None:
    assert reference_path(tmp_path, 1) is None
    (tmp_path / REFERENCE_FILE).write_bytes(b"model")
    assert reference_path(tmp_path, 1) == tmp_path / REFERENCE_FILE
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / REFERENCE_FILE).write_bytes(b"version")
    assert reference_path(tmp_path, 1) == tmp_path / "1" / REFERENCE_FILE
    assert reference_path(tmp_path, 2) == tmp_path / REFERENCE_FILE


# -- the monitor --------------------------------------------------------------------------------------------------


class Alerts(list[DriftAlert]):
    def __call__(self, alert: DriftAlert) -> None:
        self.append(alert)


def feed(monitor: DriftMonitor, x: np.ndarray, batch: int = 16) -> None:
    for start in range(0, len(x), batch):
        monitor.observe(x[start : start + batch])


def uniform_reference() -> DriftReference:
    return DriftReference.from_training(np.linspace(0, 1, 1000, dtype=np.float32).reshape(-1, 1), bins=4)


def test_the_window_fills_then_slides() -> None:
    ref = uniform_reference()
    monitor = DriftMonitor(ref, window_rows=100, psi_threshold=0.2, ks_threshold=0.2)
    low = np.full((90, 1), 0.1, np.float32)  # all in the first bin
    high = np.full((200, 1), 0.9, np.float32)  # all in the last bin
    feed(monitor, low, batch=10)
    assert monitor.snapshot is None  # not yet window_rows
    feed(monitor, high, batch=10)
    snap = monitor.snapshot
    assert snap is not None and 100 <= snap.rows < 100 + 100 // CHUNKS
    only_high = feature_histogram(high[: snap.rows], ref.edges)  # the window holds the newest rows only
    assert snap.psi == pytest.approx(population_stability_index(ref.counts, only_high))
    assert snap.ks == pytest.approx(ks_statistic(ref.counts, only_high))
    mean, var = snap.moments()
    assert mean == pytest.approx([0.9]) and var == pytest.approx([0.0], abs=1e-12)
    assert monitor.observed_rows == 290


def test_window_mean_and_variance_match_numpy() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(120, 4)).astype(np.float32)
    monitor = DriftMonitor(DriftReference.from_training(x), window_rows=120, psi_threshold=0, ks_threshold=0)
    feed(monitor, x, batch=6)  # ten chunks of 12 rows
    snap = monitor.snapshot
    assert snap is not None and snap.rows == 120
    mean, var = snap.moments()
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=0), rtol=1e-9)
    assert not snap.psi.flags.writeable  # published snapshots are immutable


def test_zero_thresholds_never_alert() -> None:
    alerts = Alerts()
    monitor = DriftMonitor(uniform_reference(), 50, psi_threshold=0, ks_threshold=0, on_alert=alerts)
    feed(monitor, np.full((200, 1), 5.0, np.float32))
    assert monitor.snapshot is not None and monitor.snapshot.psi[0] > 1 and not monitor.snapshot.drifted
    assert alerts == [] and monitor.alerts == 0


def test_a_batch_of_the_wrong_width_is_skipped_not_raised() -> None:
    monitor = DriftMonitor(uniform_reference(), 10, 0.2, 0.2)
    monitor.observe(np.zeros((4, 3), np.float32))
    monitor.observe(np.zeros((0, 1), np.float32))
    assert (monitor.skipped_batches, monitor.observed_rows) == (2, 0)


def test_a_failing_callback_does_not_reach_the_caller() -> None:
    def broken(alert: DriftAlert) -> None:
        raise RuntimeError("receiver down")

    monitor = DriftMonitor(uniform_reference(), 10, 0.2, 0.2, on_alert=broken)
    feed(monitor, np.full((20, 1), 5.0, np.float32), batch=5)
    assert monitor.alerts == 1


def test_observe_from_several_threads() -> None:
    monitor = DriftMonitor(uniform_reference(), 1000, 0.2, 0.2)
    x = np.random.default_rng(1).uniform(0, 1, size=(400, 1)).astype(np.float32)
    threads = [threading.Thread(target=feed, args=(monitor, x, 8)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert monitor.observed_rows == 1600
    snap = monitor.snapshot
    assert snap is not None and snap.rows >= 1000 and not snap.drifted


# -- the real digits data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(example_repo: Path) -> tuple[DriftReference, np.ndarray]:
    reference = DriftReference.load(example_repo / "digits" / REFERENCE_FILE)
    with np.load(example_repo / "digits" / "heldout.npz") as data:
        heldout = data["X"]
    return reference, heldout


def shifted(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 2.0, 0.0, 16.0).astype(np.float32)  # brighter strokes, as from another scanner


def noised(x: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0.0, 3.0, size=x.shape)
    return np.clip(x + noise, 0.0, 16.0).astype(np.float32)


def test_digits_reference_is_the_training_split(digits: tuple[DriftReference, np.ndarray]) -> None:
    reference, heldout = digits
    assert reference.features == 64 == heldout.shape[1]
    assert reference.rows == 1347  # 75% of the 1797 digits
    assert reference.counts.sum(axis=1).tolist() == [1347] * 64
    assert reference.counts[:, 0].sum() == reference.counts[:, -1].sum() == 0  # nothing outside its own range


@pytest.mark.parametrize("corrupt", [shifted, noised], ids=["shifted", "noised"])
def test_digits_drift_alert_fires_once_per_crossing_and_re_arms(
    digits: tuple[DriftReference, np.ndarray], corrupt: object
) -> None:
    reference, heldout = digits
    assert callable(corrupt)
    bad = corrupt(heldout)
    alerts = Alerts()
    monitor = DriftMonitor(reference, 400, 0.2, 0.2, on_alert=alerts, model="digits", version=1, input_name="input")

    feed(monitor, heldout)
    clean = monitor.snapshot
    assert clean is not None and not clean.drifted
    assert clean.psi.max() < 0.2 and clean.ks.max() < 0.2
    assert alerts == []

    feed(monitor, bad)
    feed(monitor, bad)  # staying over the threshold does not fire again
    assert monitor.snapshot is not None and monitor.snapshot.drifted
    assert len(alerts) == 1 and monitor.alerts == 1
    alert = alerts[0]
    assert (alert.model, alert.version) == ("digits", 1)
    assert alert.max_psi > 0.2 and alert.psi_features and alert.rows >= 400

    feed(monitor, heldout)  # back under: re-armed
    assert monitor.snapshot is not None and not monitor.snapshot.drifted
    assert len(alerts) == 1

    feed(monitor, bad)
    assert len(alerts) == 2 and monitor.alerts == 2
