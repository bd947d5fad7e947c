"""Where a model version runs a batch: on the event loop when its measured run time is shorter than a hand-off to
a worker thread (RunTimes, per batch size), and what ``ModelVersion.run_now`` does with that."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from benchmarks.echo import load_version
from ferry.server.models.model import RunTimes

SHORT_NS = 100_000


def test_an_unmeasured_batch_size_is_not_short() -> None:
    times = RunTimes(SHORT_NS)
    assert not times.short(1)
    times.record(1, 20_000)
    assert times.short(1)
    assert not times.short(64)  # another power of two: measured separately


def test_sizes_share_an_estimate_within_a_power_of_two_and_0_rows_is_one() -> None:
    times = RunTimes(SHORT_NS)
    times.record(5, 20_000)
    assert times.short(5) and times.short(7) and times.short(4)
    assert not times.short(8) and not times.short(3)
    times.record(0, 20_000)  # a model without a batch dimension
    assert times.short(0) and times.short(1)


def test_one_slow_reading_does_not_move_a_short_run_off_the_loop() -> None:
    times = RunTimes(SHORT_NS)
    times.record(1, 20_000)
    for _ in range(3):  # a burst of readings inflated by a paused vCPU or a GC pass
        times.record(1, 50_000_000)
    assert times.short(1)
    times.record(1, 20_000)  # and the next normal run brings the estimate straight back
    assert times.short(1)


def test_a_model_that_stays_slow_moves_to_its_threads_and_a_fast_run_brings_it_back() -> None:
    times = RunTimes(SHORT_NS)
    times.record(1, 20_000)
    for _ in range(100):
        times.record(1, 300_000)
    assert not times.short(1)
    times.record(1, 30_000)
    assert times.short(1)


def test_run_now_runs_only_measured_short_sizes_and_answers_like_onnxruntime(example_repo: Path) -> None:
    model = load_version(example_repo, "tiny")
    warm = model.stats.execution_count  # the load's warmup runs count as executions, as Triton counts them
    assert warm == model.warmup_runs >= 1

    async def scenario() -> None:
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        assert model.run_now({"input": x}, 1) is None  # nothing measured yet: the first batch goes to a thread
        for _ in range(5):  # on worker threads; the first run of a session is slow (it allocates)
            queued, _, _ = await model.infer({"input": x}, 1)
        ran = model.run_now({"input": x}, 1)
        assert ran is not None
        outputs, batch = ran
        expected = model._session.run(None, {"input": x})
        np.testing.assert_array_equal(outputs[0], expected[0])
        np.testing.assert_array_equal(queued[0], expected[0])
        assert batch.rows == 1 and batch.requests == 1
        wide = np.zeros((64, 16), np.float32)
        assert model.run_now({"input": wide}, 64) is None  # a batch size never measured
        await model.close()

    asyncio.run(scenario())
    assert model.stats.execution_count == warm + 6 and model.stats.inference_count == warm + 6
