"""The event loop's lag on /metrics, through a real server: sampled all along, and a stall of its loop shows."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ferry.server.observability.loopwatch import LAG_BUCKETS_S, METRIC
from tests.serving import BackgroundServer, background_server

WARN_S = 0.1


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("loopwatch")
    shutil.copytree(example_repo / "tiny", root / "tiny")  # one small model: the loop is what is measured
    with background_server(root, loop_lag_warn_s=WARN_S) as running:
        yield running


def lag_histogram(server: BackgroundServer) -> dict[tuple[str, str | None], float]:
    """``ferry_event_loop_lag_seconds`` scraped over HTTP: (sample name, le) -> value."""
    url = f"http://127.0.0.1:{server.server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == METRIC]
    assert family.type == "histogram"
    assert "event loop" in family.documentation
    samples: list[Sample] = family.samples
    assert all(s.labels.keys() <= {"le"} for s in samples)
    return {(s.name, s.labels.get("le")): s.value for s in samples}


def test_lag_histogram_is_exposed_and_sampled(server: BackgroundServer) -> None:
    before = lag_histogram(server)
    time.sleep(1.0)
    after = lag_histogram(server)
    les = [le for name, le in after if name == METRIC + "_bucket"]
    assert les == [str(float(b)) for b in LAG_BUCKETS_S] + ["+Inf"]
    counts = [after[(METRIC + "_bucket", le)] for le in les]
    assert counts == sorted(counts)  # cumulative
    assert after[(METRIC + "_bucket", "+Inf")] == after[(METRIC + "_count", None)]
    assert after[(METRIC + "_count", None)] > before[(METRIC + "_count", None)]  # sampled every 0.1 s
    assert after[(METRIC + "_sum", None)] >= 0


def test_a_stalled_server_loop_shows_in_the_histogram(server: BackgroundServer) -> None:
    blocked_s = 0.5

    async def block() -> None:
        time.sleep(blocked_s)  # loop work that computes: what the watchdog exists to catch

    watch = server.server.loopwatch
    assert watch.warn_s == WARN_S  # from the config
    before, stalls = lag_histogram(server), watch.stalls
    server.call(block())
    after = lag_histogram(server)  # answered on the same loop, so after the sample the stall delayed
    stalled = after[(METRIC + "_bucket", "+Inf")] - after[(METRIC + "_bucket", "0.25")]
    assert stalled > before[(METRIC + "_bucket", "+Inf")] - before[(METRIC + "_bucket", "0.25")]
    assert after[(METRIC + "_sum", None)] - before[(METRIC + "_sum", None)] >= blocked_s - 0.1  # due <= 0.1 s in
    # Past the threshold: warned, or counted for the next warning if one was logged in the last few seconds.
    assert watch.stalls > stalls
