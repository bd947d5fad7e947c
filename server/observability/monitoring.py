"""Watching predictions after they are made: the prediction log, outcomes, and drift, per model version.

``Monitoring`` holds the server-wide sinks (the JSON Lines prediction log, the outcome tracker, the event loop for
alert webhooks). ``VersionMonitor`` is what one loaded version needs of them, built from its config.pbtxt
``parameters`` while it loads; the data path calls it at two points only: ``observe_batch`` in the worker thread
after each executed batch (drift statistics, per batch, with the kernels) and ``after_request`` on the loop after
each answered request (one random draw; sampled requests are handed to the log's writer thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ferry.client._proto import model_config_pb2 as mc
from ferry.server.observability.drift import DriftAlert, DriftMonitor, batch_moments, feature_histogram
from ferry.server.observability.driftconfig import DriftSettings, load_monitor
from ferry.server.observability.outcomes import OutcomeSettings, OutcomeTracker
from ferry.server.observability.predlog import Prediction, PredictionLog, PredictionLogOptions, PredictionSampler
from ferry.server.observability.webhook import AlertWebhook


@dataclass
class Monitoring:
    """The server-wide sinks. ``loop`` is set when the server starts (alert webhooks post from it)."""

    predlog: PredictionLog | None = None
    outcomes: OutcomeTracker = field(default_factory=lambda: OutcomeTracker(window=1000, max_pending=100_000))
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class VersionMonitor:
    """One version's prediction sampling, outcome joining and drift monitor."""

    model: str
    version: int
    sha256: str
    options: PredictionLogOptions
    sampler: PredictionSampler
    outcome: OutcomeSettings | None
    drift: DriftMonitor | None
    sinks: Monitoring

    @classmethod
    def load(
        cls, config: mc.ModelConfig, model_dir: Path, version: int, sha256: str, sinks: Monitoring
    ) -> VersionMonitor:
        """Blocking (reads the drift reference); raises InvalidArgument on bad parameters."""
        options = PredictionLogOptions.from_parameters(config)
        loop = sinks.loop

        def alerts_for(settings: DriftSettings) -> Callable[[DriftAlert], None] | None:
            if settings.webhook_url and loop is not None:
                return AlertWebhook(settings.webhook_url, settings.webhook_timeout_s, loop)
            return None

        drift = load_monitor(config, model_dir, version, alerts_for)
        if drift is not None:  # compile (or load from Numba's cache) the statistics kernels before ready
            sample = np.zeros((1, drift.reference.features), np.float32)
            feature_histogram(sample, drift.reference.edges)
            batch_moments(sample)
        rate = options.rate if sinks.predlog is not None else 0.0
        return cls(
            config.name,
            version,
            sha256,
            options,
            PredictionSampler(rate),
            OutcomeSettings.from_parameters(config),
            drift,
            sinks,
        )

    def observe_batch(self, feeds: Mapping[str, np.ndarray]) -> None:
        """In the worker thread, on the client's (unpreprocessed) feeds of one executed batch."""
        if self.drift is not None:
            self.drift.observe(feeds[self.drift.input_name])

    def after_request(
        self,
        request_id: str,
        feeds: Mapping[str, np.ndarray],
        outputs: list[np.ndarray],
        output_names: list[str],
        latency_ns: int,
        trace_id: str,
        hold: bool = False,
    ) -> Prediction | None:
        """On the loop after a successful request: remember it for outcomes, log it if sampled. ``hold``: return
        the sampled entry instead of logging it (a shadowed request's entry is logged with the shadow's outputs)."""
        if self.outcome is not None and request_id and self.outcome.output in output_names:
            index = output_names.index(self.outcome.output)
            self.sinks.outcomes.remember(self.model, self.version, request_id, outputs[index], self.outcome.task)
        if self.sampler.enabled and self.sampler.sample() and self.sinks.predlog is not None:
            entry = Prediction(
                self.model,
                self.version,
                self.sha256,
                request_id,
                trace_id,
                feeds,
                dict(zip(output_names, outputs, strict=True)),
                latency_ns / 1e6,
                self.options,
            )
            if hold:
                return entry
            self.sinks.predlog.record(entry)
        return None

    @property
    def active(self) -> bool:
        """Whether ``after_request`` has anything to do for this version."""
        return self.outcome is not None or self.sampler.enabled

    async def close(self) -> None:
        if self.drift is not None and isinstance(self.drift.on_alert, AlertWebhook):
            await self.drift.on_alert.close()
        self.sinks.outcomes.drop_version(self.model, self.version)


def metric_families(monitors: list[VersionMonitor], sinks: Monitoring) -> Iterator[Metric]:
    """Drift, outcome and prediction-log metrics, for the /metrics collector."""
    labels = ["model", "version"]
    psi = GaugeMetricFamily("ferry_drift_psi", "Population stability index of a feature over the window.",
                            labels=[*labels, "feature"])  # fmt: skip
    ks = GaugeMetricFamily("ferry_drift_ks", "Two-sample KS statistic (binned) of a feature over the window.",
                           labels=[*labels, "feature"])  # fmt: skip
    alerts = CounterMetricFamily(
        "ferry_drift_alerts", "Drift alerts fired (one per threshold crossing).", labels=labels
    )
    rows = CounterMetricFamily("ferry_drift_observed_rows", "Rows seen by the drift monitor.", labels=labels)
    accuracy = GaugeMetricFamily("ferry_outcome_accuracy", "Live accuracy over the outcome window.", labels=labels)
    error = GaugeMetricFamily(
        "ferry_outcome_mean_abs_error", "Live mean absolute error over the window.", labels=labels
    )
    joined = GaugeMetricFamily("ferry_outcome_window", "Outcomes in the rolling window.", labels=labels)
    for monitor in monitors:
        key = [monitor.model, str(monitor.version)]
        drift = monitor.drift
        if drift is not None:
            alerts.add_metric(key, drift.alerts)
            rows.add_metric(key, drift.observed_rows)
            snapshot = drift.snapshot
            if snapshot is not None:
                for feature, (p, k) in enumerate(zip(snapshot.psi, snapshot.ks, strict=True)):
                    psi.add_metric([*key, str(feature)], float(p))
                    ks.add_metric([*key, str(feature)], float(k))
        stats = sinks.outcomes.stats(monitor.model, monitor.version)
        if stats is not None:
            joined.add_metric(key, stats.count)
            if stats.accuracy is not None:
                accuracy.add_metric(key, stats.accuracy)
            if stats.mean_abs_error is not None:
                error.add_metric(key, stats.mean_abs_error)
    yield from (psi, ks, alerts, rows, accuracy, error, joined)
    log: Any = sinks.predlog
    written = CounterMetricFamily("ferry_prediction_log_written", "Predictions written to the log.")
    dropped = CounterMetricFamily("ferry_prediction_log_dropped", "Sampled predictions dropped: the queue was full.")
    written.add_metric([], log.written if log else 0)
    dropped.add_metric([], log.dropped if log else 0)
    yield from (written, dropped)
