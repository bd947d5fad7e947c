"""Drift settings from config.pbtxt, the per-version monitor factory, and alert webhooks against a real HTTP
receiver on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from google.protobuf import text_format

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.observability.drift import REFERENCE_FILE, DriftAlert, DriftMonitor, DriftReference
from ferry.server.observability.driftconfig import DriftSettings, feature_count, load_monitor
from ferry.server.observability.webhook import AlertWebhook

WAIT_S = 10


def _config(
    text: str = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', **parameters: str
) -> mc.ModelConfig:
    config = text_format.Parse(f'name: "m"\nmax_batch_size: 8\n{text}', mc.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


# -- settings -----------------------------------------------------------------------------------------------------


def test_settings_defaults_name_the_only_input() -> None:
    assert DriftSettings.from_parameters(_config()) == DriftSettings(input_name="x")
    assert DriftSettings() == DriftSettings(0.2, 0.2, 1000, "", None, 2.0)


def test_settings_from_parameters() -> None:
    config = _config(
        drift_psi_threshold="0.5",
        drift_ks_threshold="0",
        drift_window_rows="250",
        drift_input="x",
        drift_webhook_url="https://alerts.example/hook",
        drift_webhook_timeout_s="0.5",
    )
    assert DriftSettings.from_parameters(config) == DriftSettings(
        0.5, 0.0, 250, "x", "https://alerts.example/hook", 0.5
    )


TWO_INPUTS = 'input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]'


@pytest.mark.parametrize(
    ("text", "parameters", "message"),
    [
        (None, {"drift_psi_threshold": "high"}, "drift_psi_threshold must be a number in [0, inf], got 'high'"),
        (None, {"drift_psi_threshold": "-1"}, "drift_psi_threshold must be a number in [0, inf], got '-1'"),
        (None, {"drift_ks_threshold": "1.5"}, "drift_ks_threshold must be a number in [0, 1], got '1.5'"),
        (None, {"drift_window_rows": "0"}, "drift_window_rows must be an integer in 1..10000000, got '0'"),
        (None, {"drift_window_rows": "1e3"}, "drift_window_rows must be an integer in 1..10000000, got '1e3'"),
        (None, {"drift_input": "y"}, "drift_input 'y' is not an input of the model (inputs: ['x'])"),
        (TWO_INPUTS, {}, "drift_input must name one of the inputs ['a', 'b']"),
        (None, {"drift_webhook_url": "ftp://x"}, "drift_webhook_url must be an http:// or https:// URL"),
        (None, {"drift_webhook_timeout_s": "0"}, "drift_webhook_timeout_s must be a number in [0.001, 60]"),
    ],
)
def test_settings_reject_bad_parameters(text: str | None, parameters: dict[str, str], message: str) -> None:
    config = _config(text, **parameters) if text else _config(**parameters)
    with pytest.raises(InvalidArgument) as caught:
        DriftSettings.from_parameters(config)
    assert caught.value.message.startswith("model 'm' parameters: ")
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("text", "batching", "features"),
    [
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 64 ] } ]', True, 64),
        ('input [ { name: "x" data_type: TYPE_UINT8 dims: [ 8, 8 ] } ]', True, 64),
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 64 ] } ]', False, 64),
    ],
)
def test_feature_count(text: str, batching: bool, features: int) -> None:
    config = _config(text)
    config.max_batch_size = 8 if batching else 0
    assert feature_count(config, "x") == features


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]', "a fixed number of features per row"),
        ('input [ { name: "x" data_type: TYPE_STRING dims: [ 4 ] } ]', "a numeric input, not TYPE_STRING"),
    ],
)
def test_feature_count_needs_fixed_numeric_rows(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="drift needs") as caught:
        feature_count(_config(text), "x")
    assert message in caught.value.message


# -- one version's monitor ----------------------------------------------------------------------------------------


def _write_reference(path: Path, features: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.random.default_rng(0).normal(size=(100, features))
    path.write_bytes(DriftReference.from_training(rows).to_bytes())


def test_no_reference_file_means_no_monitor(tmp_path: Path) -> None:
    assert load_monitor(_config(), tmp_path, 1) is None


def test_drift_parameters_without_a_reference_file_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_monitor(_config(drift_window_rows="10"), tmp_path, 1)
    assert caught.value.message == (
        f"model 'm' version 1: parameters ['drift_window_rows'] are set, but there is no {REFERENCE_FILE} in "
        f"{tmp_path / '1'} or {tmp_path}"
    )


def test_monitor_from_the_version_directory(tmp_path: Path) -> None:
    _write_reference(tmp_path / "2" / REFERENCE_FILE, 4)
    _write_reference(tmp_path / REFERENCE_FILE, 3)  # the model-wide file, shadowed for version 2
    seen: list[DriftSettings] = []

    def alerts_for(settings: DriftSettings) -> Callable[[DriftAlert], None]:
        seen.append(settings)
        return print

    config = _config(drift_window_rows="50", drift_ks_threshold="0.3", drift_webhook_url="http://hook")
    monitor = load_monitor(config, tmp_path, 2, alerts_for)
    assert isinstance(monitor, DriftMonitor)
    assert seen == [DriftSettings(0.2, 0.3, 50, "x", "http://hook", 2.0)] and monitor.on_alert is print
    assert (monitor.model, monitor.version, monitor.input_name) == ("m", 2, "x")
    assert (monitor.window_rows, monitor.psi_threshold, monitor.ks_threshold) == (50, 0.2, 0.3)
    assert monitor.reference.features == 4


def test_a_reference_of_another_width_is_an_error(tmp_path: Path) -> None:
    _write_reference(tmp_path / REFERENCE_FILE, 3)
    with pytest.raises(InvalidArgument, match=r"input 'x' has 4 features per row, but .* has statistics of 3"):
        load_monitor(_config(), tmp_path, 1)


def test_a_broken_reference_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / REFERENCE_FILE).write_bytes(b"not a zip")
    with pytest.raises(InvalidArgument, match="model 'm' version 1: bad drift reference: "):
        load_monitor(_config(), tmp_path, 1)


# -- webhooks -----------------------------------------------------------------------------------------------------


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


class Receiver:
    """An HTTP server on 127.0.0.1:0 that records POSTed JSON bodies; ``release`` gates its answers."""

    def __init__(self, status: int = 204, gated: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        if not gated:
            self.release.set()
        self.status = status
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        await self.release.wait()
        return web.Response(status=self.status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


def _alert() -> DriftAlert:
    return DriftAlert("m", 1, 100, 0.5, 0.3, (0, 2), (), 0.2, 0.2, 1_700_000_000.0)


def test_a_drift_alert_from_a_worker_thread_is_posted() -> None:
    async def test() -> None:
        async with Receiver() as receiver:
            webhook = AlertWebhook(receiver.url, 5.0, asyncio.get_running_loop())
            reference = DriftReference.from_training(np.linspace(0, 1, 100).reshape(-1, 1))
            monitor = DriftMonitor(reference, 20, 0.2, 0.2, on_alert=webhook, model="m", version=3)
            await asyncio.to_thread(monitor.observe, np.full((40, 1), 9.0, np.float32))  # far outside the range
            await asyncio.wait_for(receiver.arrived.wait(), WAIT_S)
            await webhook.close()
        body = receiver.bodies[0]
        assert body["event"] == "drift_alert"
        assert (body["model"], body["version"], body["psi_features"], body["psi_threshold"]) == ("m", 3, [0], 0.2)
        assert (webhook.sent, webhook.failed, webhook.dropped) == (1, 0, 0)

    run(test)


def test_a_slow_receiver_is_cut_off_by_the_timeout() -> None:
    async def test() -> None:
        async with Receiver(gated=True) as receiver:  # never answers until the test ends
            webhook = AlertWebhook(receiver.url, 0.2, asyncio.get_running_loop())
            webhook(_alert())
            await asyncio.wait_for(receiver.arrived.wait(), WAIT_S)
            await asyncio.wait_for(webhook.close(), WAIT_S)  # returns once the POST timed out
            assert (webhook.sent, webhook.failed) == (0, 1)

    run(test)


def test_an_error_status_counts_as_failed() -> None:
    async def test() -> None:
        async with Receiver(status=500) as receiver:
            webhook = AlertWebhook(receiver.url, 5.0, asyncio.get_running_loop())
            webhook(_alert())
            await asyncio.wait_for(receiver.arrived.wait(), WAIT_S)
            await webhook.close()
            assert (webhook.sent, webhook.failed) == (0, 1)

    run(test)


def test_posts_in_flight_are_bounded() -> None:
    async def test() -> None:
        async with Receiver(gated=True) as receiver:
            webhook = AlertWebhook(receiver.url, 5.0, asyncio.get_running_loop(), max_in_flight=1)
            webhook(_alert())
            webhook(_alert())  # the first is still in flight: dropped
            await asyncio.wait_for(receiver.arrived.wait(), WAIT_S)
            receiver.release.set()
            await webhook.close()
            webhook(_alert())  # closed: dropped
            await asyncio.sleep(0)  # let the scheduled callback run (ordering only)
            assert (webhook.sent, webhook.dropped) == (1, 2)
            assert len(receiver.bodies) == 1

    run(test)


def test_an_alert_after_the_loop_closed_is_dropped() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    webhook = AlertWebhook("http://127.0.0.1:9/hook", 1.0, loop)
    webhook(_alert())
    assert webhook.dropped == 1


def test_the_alert_log_names_the_window_it_measured_and_the_configured_one(caplog: pytest.LogCaptureFixture) -> None:
    """Batches of 64 fill a window of 1000 rows in chunks of 128: the log says both numbers, not one for the other."""
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(DriftReference.from_training(rng.normal(size=(2000, 4))), 1000, 0.2, 0.2, model="m")
    with caplog.at_level("WARNING", logger="ferry.server.observability.drift"):
        for _ in range(16):
            monitor.observe((rng.normal(size=(64, 4)) + 5).astype(np.float32))  # far from the reference
    assert monitor.alerts == 1
    (message,) = [r.getMessage() for r in caplog.records if "drift alert" in r.getMessage()]
    assert "over a window of 1024 rows (drift_window_rows 1000;" in message
