"""One loaded model version: its onnxruntime session, tensor specs, statistics, and the executor that runs it.

The executor is Ferry's one concurrency boundary: the event loop hands inputs to the version's worker threads and
awaits the outputs; onnxruntime releases the GIL while it computes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from opentelemetry.trace import Link, SpanContext

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import FerryError, Internal, InvalidArgument, Unavailable
from ferry.server.config import GRAPH_OPTIMIZATION_LEVELS, ServerConfig
from ferry.server.models.batching import Batcher, BatchPolicy
from ferry.server.models.executor import ModelExecutor
from ferry.server.models.modelconfig import (
    GraphTensor,
    TensorSpec,
    batch_policy,
    complete_config,
    instance_count,
    tensor_specs,
)
from ferry.server.models.preprocess import Pipeline
from ferry.server.models.routing import PARAMETERS as ROUTING_PARAMETERS
from ferry.server.models.warmup import warmup_samples
from ferry.server.observability.driftconfig import PARAMETERS as DRIFT_PARAMETERS
from ferry.server.observability.monitoring import Monitoring, VersionMonitor
from ferry.server.observability.outcomes import PARAMETERS as OUTCOME_PARAMETERS
from ferry.server.observability.predlog import PARAMETERS as PREDLOG_PARAMETERS
from ferry.server.observability.stats import VersionStats
from ferry.server.observability.telemetry import NO_TRACING, Tracing

log = logging.getLogger(__name__)

_OPT_LEVELS = dict(
    zip(
        GRAPH_OPTIMIZATION_LEVELS,
        (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ),
        strict=True,
    )
)
# config.pbtxt `parameters` keys Ferry reads: session options (Triton's onnxruntime backend uses the first two too),
# then the prediction log, outcomes, drift and routing; other keys are logged and ignored.
SESSION_PARAMETERS = (
    "intra_op_thread_count",
    "inter_op_thread_count",
    "graph_optimization_level",
    "execution_provider",
    "allow_spinning",
    *PREDLOG_PARAMETERS,
    *OUTCOME_PARAMETERS,
    *DRIFT_PARAMETERS,
    *ROUTING_PARAMETERS,
)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    intra_op_threads: int
    inter_op_threads: int
    graph_optimization_level: str
    execution_provider: str
    spinning: bool

    @classmethod
    def resolve(cls, server: ServerConfig, config: mc.ModelConfig, instances: int = 1) -> SessionSettings:
        """Server flags, overridden by the model's config.pbtxt `parameters`. Intra-op threads left at 0 become
        cores // instances (at least 1), so N instances running at once do not oversubscribe the cores."""
        params = {k: v.string_value for k, v in config.parameters.items()}
        where = f"model {config.name!r} parameters"
        for key in params:
            if key not in SESSION_PARAMETERS:
                log.warning("%s: ignoring unknown key %r (known: %s)", where, key, ", ".join(SESSION_PARAMETERS))

        def count(key: str, default: int) -> int:
            raw = params.get(key)
            if raw is None:
                return default
            if not raw.isdigit() or int(raw) > 1024:
                raise InvalidArgument(f"{where}: {key} must be an integer in 0..1024, got {raw!r}")
            return int(raw)

        level = params.get("graph_optimization_level", server.graph_optimization_level)
        if level not in _OPT_LEVELS:
            raise InvalidArgument(f"{where}: graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}")
        provider = params.get("execution_provider", server.execution_provider)
        if provider not in ("cpu", "cuda"):
            raise InvalidArgument(f"{where}: execution_provider must be cpu or cuda, got {provider!r}")
        return cls(
            count("intra_op_thread_count", server.intra_op_threads) or max(1, (os.cpu_count() or 1) // instances),
            count("inter_op_thread_count", server.inter_op_threads),
            level,
            provider,
            _flag(params.get("allow_spinning"), server.ort_spinning, f"{where}: allow_spinning"),
        )

    def providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.execution_provider == "cuda":
            if "CUDAExecutionProvider" in available:
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]
            log.warning("execution_provider cuda asked for, but onnxruntime has no CUDA provider: using the CPU")
        return ["CPUExecutionProvider"]

    def session(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = _OPT_LEVELS[self.graph_optimization_level]
        if not self.spinning:  # idle pool threads sleep instead of spinning on the cores the event loop needs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), sess_options=options, providers=self.providers())


def _flag(raw: str | None, default: bool, what: str) -> bool:
    if raw is None:
        return default
    if raw.lower() not in ("true", "false", "1", "0"):
        raise InvalidArgument(f"{what} must be true or false, got {raw!r}")
    return raw.lower() in ("true", "1")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _graph(args: list[ort.NodeArg]) -> list[GraphTensor]:
    return [
        GraphTensor(a.name, a.type, tuple(d if isinstance(d, int) and d >= 0 else None for d in a.shape)) for a in args
    ]


class RunTimes:
    """Whether a batch of a given size runs in less than ``short_ns``: one estimate per batch size (rows rounded
    up to a power of two), fed by ``ModelVersion._run_sync``'s readings (a worker thread's CPU time, since its wall
    time includes waits for the GIL while the loop is busy; the wall time of a run on the loop). An estimate falls
    at once to a faster run but rises only slowly: on a shared machine a ~20 µs run sometimes reads 100+ µs (the
    vCPU was taken away), and a plain moving average of such readings kept tiny on its worker threads for long
    stretches. A size never measured is not short."""

    __slots__ = ("_estimates", "short_ns")

    RISE = 0.05  # the weight of a slower reading

    def __init__(self, short_ns: int) -> None:
        self.short_ns = short_ns
        self._estimates: dict[int, float] = {}

    def short(self, rows: int) -> bool:
        """``rows`` 0 is a model without a batch dimension (one row)."""
        return self._estimates.get(max(rows, 1).bit_length(), float("inf")) < self.short_ns

    def record(self, rows: int, took_ns: int) -> None:
        size = max(rows, 1).bit_length()
        estimate = self._estimates.get(size, float("inf"))
        if took_ns < estimate:
            self._estimates[size] = took_ns
        else:  # readings are capped, so a slow one moves a short estimate by a bounded step
            self._estimates[size] = estimate + self.RISE * (min(took_ns, 4 * self.short_ns) - estimate)


@dataclass(slots=True)
class BatchInfo:
    """One executed batch, as each of its requests sees it (perf_counter_ns readings)."""

    batch_id: int
    rows: int
    requests: int
    started_ns: int
    preprocessed_ns: int
    computed_ns: int
    done_ns: int
    span: SpanContext | None = None


class ModelVersion:
    """A ready model version. Create with :meth:`load` (blocking: call it off the event loop)."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        path: Path,
        session: ort.InferenceSession,
        sha256: str,
        load_seconds: float,
        policy: BatchPolicy,
        tracing: Tracing,
        pipeline: Pipeline | None = None,
        inline_run_us: int = 0,
    ) -> None:
        self.name = config.name
        self.version = version
        self.version_str = str(version)
        self.config = config
        self.path = path
        self.sha256 = sha256
        self.loaded_at = time.time()  # when it finished loading (set again once warmed: when it could serve)
        self.load_seconds = load_seconds
        self.warmup_seconds = 0.0
        self.warmup_runs = 0
        self.max_batch_size = config.max_batch_size
        self.inputs, self.outputs = tensor_specs(config)
        self.input_by_name: dict[str, TensorSpec] = {t.name: t for t in self.inputs}
        self.input_what = {t.name: f"{self.describe()} input {t.name!r}" for t in self.inputs}  # names in errors
        self.output_by_name: dict[str, TensorSpec] = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]
        self.output_index = {name: i for i, name in enumerate(self.output_names)}
        self.stats = VersionStats()
        self.policy = policy
        self._tracing = tracing
        self._batches = 0
        # Batches that run faster than the hand-off to a worker thread (~40-90 µs here) run on the event loop:
        # measured on the 2-core machine, tiny's batch-1 round trip fell from ~120 to ~60 µs.
        self._run_times = RunTimes(inline_run_us * 1000)
        self.cache_enabled = config.response_cache.enable
        self._session = session
        self.pipeline = pipeline  # preprocess.json's kernels: client feeds -> graph feeds, on each formed batch
        self.monitor: VersionMonitor | None = None  # prediction log, outcomes and drift (set by load)
        self._fixed_shapes = all(-1 not in t.dims and not t.optional for t in self.inputs)
        self._executor = ModelExecutor(policy.instances, f"ferry-{self.name}-v{version}")
        self._batcher = Batcher(policy, self._run_batch, self.describe())

    @classmethod
    def load(
        cls,
        server: ServerConfig,
        config: mc.ModelConfig,
        model_name: str,
        version: int,
        path: Path,
        tracing: Tracing = NO_TRACING,
        monitoring: Monitoring | None = None,
    ) -> ModelVersion:
        """Blocking: call it off the event loop."""
        start = time.perf_counter()
        settings = SessionSettings.resolve(server, config, instance_count(config))
        try:
            session = settings.session(path)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise InvalidArgument(f"onnxruntime cannot load {path}: {err}") from None
        pipeline = Pipeline.load(path.parent.parent, config)
        inputs = _graph(session.get_inputs())
        if pipeline is not None:  # the config describes what clients send: the pipeline's inputs
            inputs = pipeline.client_inputs(inputs)
        done = complete_config(config, model_name, inputs, _graph(session.get_outputs()))
        policy = batch_policy(done, server.max_queue_size)
        if pipeline is not None:
            pipeline.warmup()  # compile or load the kernels now: the first request must not pay for it
        sha256 = sha256_of(path)
        load_seconds = time.perf_counter() - start
        loaded = cls(
            done, version, path, session, sha256, load_seconds, policy, tracing, pipeline, server.inline_run_us
        )
        try:
            loaded.warm(path.parent.parent)  # before the monitor: warmup data is not traffic (drift, predictions)
            loaded.monitor = VersionMonitor.load(done, path.parent.parent, version, sha256, monitoring or Monitoring())
        except BaseException:
            loaded._executor.shutdown()  # its threads would outlive the failed load
            raise
        loaded.load_seconds = time.perf_counter() - start
        loaded.loaded_at = time.time()
        return loaded

    def warm(self, model_dir: Path) -> None:
        """Run the warmup samples (blocking, on the loading thread): ``model_warmup``, or Ferry's default. Each run
        counts in the version's statistics, as a request's batch would. A failing run fails the load."""
        began = time.perf_counter()
        runs = 0
        for sample in warmup_samples(self.config, self.inputs, model_dir):
            for _ in range(sample.count):
                try:
                    self._finished([None], *self._run_sync([sample.feeds]))
                except Exception as err:
                    message = err.message if isinstance(err, FerryError) else str(err)
                    raise InvalidArgument(f"{self.describe()}: warmup {sample.name!r} failed: {message}") from None
                runs += 1
        self.warmup_runs = runs
        self.warmup_seconds = time.perf_counter() - began
        log.info("warmed %s: %d runs in %.3fs", self.describe(), runs, self.warmup_seconds)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return self._batcher.queued

    def describe(self) -> str:
        return f"model {self.name!r} version {self.version}"

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        rows: int,
        *,
        deadline: float | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        span: SpanContext | None = None,
    ) -> tuple[list[np.ndarray], float, BatchInfo]:
        """Queue one request's feeds for a batch; returns all outputs (in config order) for its rows, the seconds
        it spent queued, and the batch it ran in. ``span`` is the request's span, linked from the batch span."""
        signature = None if self._fixed_shapes else tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))
        (outputs, info), queued_s = await self._batcher.submit(
            (feeds, span, rows), max(rows, 1), signature, deadline=deadline, priority=priority, timeout_s=timeout_s
        )
        return outputs, queued_s, info

    def run_now(
        self, feeds: dict[str, np.ndarray], rows: int, span: SpanContext | None = None
    ) -> tuple[list[np.ndarray], BatchInfo] | None:
        """Run one request at once on the event loop, when that is how its batch would run anyway: nothing queued,
        an instance free, and recent runs shorter than a hand-off to a worker thread. None when it cannot: queue it
        with :meth:`infer`. It never yields the loop, so no other request can take the instance meanwhile."""
        if not self._run_times.short(rows) or not self._batcher.idle():
            return None
        ((outputs, info),) = self._finished([span], *self._run_sync([feeds]))
        return outputs, info

    async def _run_batch(
        self, batch: list[tuple[dict[str, np.ndarray], SpanContext | None, int]]
    ) -> list[tuple[list[np.ndarray], BatchInfo]]:
        feeds = [f for f, _, _ in batch]
        if self._run_times.short(sum(rows for _, _, rows in batch)):
            ran = self._run_sync(feeds)
        else:
            try:
                ran = await self._executor.submit(self._run_sync, feeds, True)
            except RuntimeError as err:  # the executor was shut down: the version is unloading
                raise Unavailable(f"{self.describe()} is unloading: {err}") from None
        return self._finished([span for _, span, _ in batch], *ran)

    def _finished(
        self,
        spans: list[SpanContext | None],
        results: list[list[np.ndarray]],
        rows: int,
        times: tuple[int, int, int, int],
        took: int,
    ) -> list[tuple[list[np.ndarray], BatchInfo]]:
        """Account for one executed batch (run time average, statistics, batch span); pair each request's
        outputs with the batch's description. ``took``: how long the run took, as ``_run_sync`` reads it."""
        t0, t1, t2, t3 = times
        self._run_times.record(rows, took)
        self.stats.record_execution(rows, t1 - t0, t2 - t1, t3 - t2)
        self._batches += 1
        info = BatchInfo(self._batches, rows, len(results), t0, t1, t2, t3)
        if self._tracing.enabled:
            sampled = [span for span in spans if span is not None]
            if sampled:  # a batch of unsampled requests records nothing
                info.span = self._trace_batch(info, sampled)
        return [(outputs, info) for outputs in results]

    def _trace_batch(self, info: BatchInfo, requests: list[SpanContext]) -> SpanContext:
        attributes = {
            "ferry.model": self.name,
            "ferry.model_version": self.version,
            "ferry.model_sha256": self.sha256,
            "ferry.batch_id": info.batch_id,
            "ferry.batch_rows": info.rows,
            "ferry.batch_requests": info.requests,
        }
        links = [Link(context) for context in requests]
        # Its preprocess and model-run stages are recorded under each request it served, not again under it: every
        # span costs ~60 µs to encode for OTLP, in this process, which is most of what tracing costs.
        return self._tracing.stage("batch", info.started_ns, info.done_ns, None, attributes, links)

    def _run_sync(
        self, batch: list[dict[str, np.ndarray]], on_worker: bool = False
    ) -> tuple[list[list[np.ndarray]], int, tuple[int, int, int, int], int]:
        """On a worker thread (or the loop): one concatenation per input, one onnxruntime run, outputs split back
        as views. Returns the per-request outputs, the rows, perf_counter_ns readings at start, after concatenation
        (and preprocessing), after the run, and at the end, and the time it took: on a worker, the thread's CPU
        time (its wall time includes waits for the GIL); on the loop, the wall time."""
        cpu = time.thread_time_ns() if on_worker else 0  # a syscall (~1.5 µs): only where wall time misleads
        t0 = time.perf_counter_ns()
        one = len(batch) == 1
        feeds = client_feeds = (
            batch[0] if one else {name: np.concatenate([f[name] for f in batch]) for name in batch[0]}
        )
        if self.pipeline is not None:
            feeds = self.pipeline(feeds)
        t1 = time.perf_counter_ns()
        try:
            outputs = self._session.run(self.output_names, feeds)
        except Exception as err:
            raise Internal(
                f"{self.describe()}: onnxruntime failed on a batch of {len(batch)} requests: {err}"
            ) from None
        t2 = time.perf_counter_ns()
        if self.monitor is not None and self.monitor.drift is not None:
            self.monitor.observe_batch(client_feeds)  # drift statistics, once per batch, on what clients sent
        if len(batch) == 1:
            results = [outputs]
            rows = len(outputs[0]) if self.max_batch_size > 0 and outputs[0].ndim else 1
        else:
            sizes = [len(next(iter(f.values()))) for f in batch]
            rows = sum(sizes)
            for name, out in zip(self.output_names, outputs, strict=True):
                if out.ndim == 0 or out.shape[0] != rows:
                    raise Internal(f"{self.describe()}: output {name!r} has {out.shape[:1]} rows for a batch of {rows}")
            bounds = np.cumsum([0, *sizes]).tolist()
            results = [[out[a:b] for out in outputs] for a, b in itertools.pairwise(bounds)]
        t3 = time.perf_counter_ns()
        return results, rows, (t0, t1, t2, t3), time.thread_time_ns() - cpu if on_worker else t3 - t0

    def discard(self) -> None:
        """Release a version that loaded but was never published (it served nothing): its worker threads."""
        self._executor.shutdown()

    async def retire(self) -> None:
        """Swapped out or unloaded: answer everything queued or running (and what reaches it while it drains),
        then close."""
        await self._batcher.drain()
        await self.close()

    async def close(self) -> None:
        """Fail queued requests, let running batches finish, then stop the executor."""
        await self._batcher.close()
        if self.monitor is not None:
            await self.monitor.close()
        self._executor.shutdown()
