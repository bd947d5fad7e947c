"""Prediction log, outcomes and drift through a real server on the example digits models."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import BackgroundServer, background_server

CONFIG = """name: "digits"
max_batch_size: 64
version_policy: { specific { versions: [ 1 ] } }
dynamic_batching { }
parameters { key: "prediction_log_rate" value: { string_value: "1" } }
parameters { key: "prediction_log_hash" value: { string_value: "input" } }
parameters { key: "outcome_output" value: { string_value: "label" } }
parameters { key: "drift_window_rows" value: { string_value: "300" } }
parameters { key: "drift_psi_threshold" value: { string_value: "0.25" } }
parameters { key: "drift_ks_threshold" value: { string_value: "0" } }
parameters { key: "drift_webhook_url" value: { string_value: "%s" } }
"""


class Hook:
    """A webhook receiver on 127.0.0.1 in its own thread; alerts land in ``received``."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        async def receive(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            self.arrived.set()
            return web.Response(status=204)

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/alert", receive)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def served(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory, hook: Hook
) -> Iterator[tuple[BackgroundServer, Path]]:
    root = tmp_path_factory.mktemp("monitoring")
    shutil.copytree(example_repo / "digits", root / "digits")
    (root / "digits" / "config.pbtxt").write_text(CONFIG % f"http://127.0.0.1:{hook.port}/alert")
    log = root.parent / f"{root.name}-predictions.jsonl"
    with background_server(root, prediction_log_path=log) as running:
        yield running, log


def heldout(example_repo: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(example_repo / "digits" / "heldout.npz")
    return data["X"].astype(np.float32), data["y"]


def scrape(server: BackgroundServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def infer_rows(server: BackgroundServer, x: np.ndarray, prefix: str, rows: int = 8) -> list[np.ndarray]:
    async def fire() -> list[Any]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                stub.ModelInfer(request_for("digits", {"input": x[i : i + rows]}, id=f"{prefix}{i // rows}"))
                for i in range(0, len(x), rows)
            ]
            return list(await asyncio.gather(*calls))

    return [outputs_of(r)["label"] for r in asyncio.run(fire())]


V1 = (("model", "digits"), ("version", "1"))


def test_outcomes_give_live_accuracy(served: tuple[BackgroundServer, Path], example_repo: Path) -> None:
    server, _ = served
    x, y = heldout(example_repo)
    x, y = x[:200], y[:200]
    labels = np.concatenate(infer_rows(server, x, "acc-"))
    with grpc.insecure_channel(server.address) as channel:
        stub = fpb_grpc.OutcomeServiceStub(channel)
        outcomes = [
            fpb.Outcome(request_id=f"acc-{i // 8}", model_name="digits", label=int(y[i]), row=i % 8) for i in range(200)
        ]
        outcomes.append(fpb.Outcome(request_id="never-sent", model_name="digits", label=1))
        reply = stub.ReportOutcomes(fpb.ReportOutcomesRequest(outcomes=outcomes))
        assert (reply.matched, reply.unmatched, list(reply.unmatched_index)) == (200, 1, [200])
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportOutcomes(fpb.ReportOutcomesRequest(outcomes=[fpb.Outcome(request_id="", model_name="digits")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = scrape(server)
    assert metrics[("ferry_outcome_accuracy", V1)] == pytest.approx(float(np.mean(labels == y)))
    assert metrics[("ferry_outcome_window", V1)] == 200


def test_held_out_data_does_not_drift_but_noise_does(
    served: tuple[BackgroundServer, Path], example_repo: Path, hook: Hook
) -> None:
    server, _ = served
    x, _ = heldout(example_repo)
    infer_rows(server, x[:320], "clean-")
    calm = scrape(server)
    psi = [v for (name, labels), v in calm.items() if name == "ferry_drift_psi" and dict(labels)["version"] == "1"]
    assert len(psi) == 64 and max(psi) < 0.25
    assert calm[("ferry_drift_alerts_total", V1)] == 0 and not hook.received

    noisy = np.clip(x[:320] + np.random.default_rng(0).normal(6.0, 3.0, x[:320].shape), 0, 16).astype(np.float32)
    infer_rows(server, noisy, "noisy-")
    assert hook.arrived.wait(10), "no drift webhook within 10 s"
    drifted = scrape(server)
    assert drifted[("ferry_drift_alerts_total", V1)] == 1  # once per crossing, not once per batch
    assert max(v for (name, labels), v in drifted.items() if name == "ferry_drift_psi") > 0.25
    (alert,) = hook.received
    assert alert["event"] == "drift_alert" and alert["model"] == "digits" and alert["version"] == 1


def test_sampled_predictions_reach_the_log(served: tuple[BackgroundServer, Path], example_repo: Path) -> None:
    server, log = served
    x, _ = heldout(example_repo)
    infer_rows(server, x[:16], "log-")
    predlog = server.server.monitoring.predlog
    assert predlog is not None
    predlog.close()  # flushes the writer thread (the server closes it again on stop, harmlessly)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    ours = [e for e in entries if e["request_id"].startswith("log-")]
    assert {e["request_id"] for e in ours} == {"log-0", "log-1"}
    entry = ours[0]
    assert entry["model"] == "digits" and entry["version"] == 1 and len(entry["sha256"]) == 64
    assert entry["latency_ms"] > 0 and entry["timestamp"].endswith("Z")
    assert "sha256" in entry["inputs"]["input"] and "data" not in entry["inputs"]["input"]  # hashed, not logged
    assert entry["outputs"]["label"]["shape"] == [8] and len(entry["outputs"]["probabilities"]["data"]) == 80
