"""One loaded model version: its onnxruntime session, tensor specs, statistics, and the executor that runs it.

The executor is Ferry's one concurrency boundary: the event loop hands inputs to the version's worker threads and
awaits the outputs; onnxruntime releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from client._proto import model_config_pb2 as mc
from client.errors import DeadlineExceeded, Internal, InvalidArgument
from server.config import GRAPH_OPTIMIZATION_LEVELS, ServerConfig
from server.modelconfig import GraphTensor, TensorSpec, complete_config, tensor_specs
from server.stats import VersionStats

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
# config.pbtxt `parameters` keys that tune the session (Triton's onnxruntime backend uses the first two too).
SESSION_PARAMETERS = (
    "intra_op_thread_count",
    "inter_op_thread_count",
    "graph_optimization_level",
    "execution_provider",
)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    intra_op_threads: int
    inter_op_threads: int
    graph_optimization_level: str
    execution_provider: str

    @classmethod
    def resolve(cls, server: ServerConfig, config: mc.ModelConfig) -> SessionSettings:
        """Server flags, overridden by the model's config.pbtxt `parameters`."""
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
            count("intra_op_thread_count", server.intra_op_threads),
            count("inter_op_thread_count", server.inter_op_threads),
            level,
            provider,
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
        return ort.InferenceSession(str(path), sess_options=options, providers=self.providers())


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
    ) -> None:
        self.name = config.name
        self.version = version
        self.version_str = str(version)
        self.config = config
        self.path = path
        self.sha256 = sha256
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.max_batch_size = config.max_batch_size
        self.inputs, self.outputs = tensor_specs(config)
        self.input_by_name: dict[str, TensorSpec] = {t.name: t for t in self.inputs}
        self.output_by_name: dict[str, TensorSpec] = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]
        self.stats = VersionStats()
        self._session = session
        workers = sum(max(g.count, 1) for g in config.instance_group) or 1
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"ferry-{self.name}-v{version}")

    @classmethod
    def load(
        cls, server: ServerConfig, config: mc.ModelConfig, model_name: str, version: int, path: Path
    ) -> ModelVersion:
        start = time.perf_counter()
        settings = SessionSettings.resolve(server, config)
        try:
            session = settings.session(path)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise InvalidArgument(f"onnxruntime cannot load {path}: {err}") from None
        done = complete_config(config, model_name, _graph(session.get_inputs()), _graph(session.get_outputs()))
        return cls(done, version, path, session, sha256_of(path), time.perf_counter() - start)

    def describe(self) -> str:
        return f"model {self.name!r} version {self.version}"

    async def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str], deadline: float | None
    ) -> tuple[list[np.ndarray], int, int]:
        """Run the model on the version's executor: the outputs, ns spent queued and ns computing."""
        loop = asyncio.get_running_loop()
        queued = time.perf_counter_ns()
        outputs, started, infer_ns = await loop.run_in_executor(
            self._executor, self._run_sync, feeds, output_names, deadline
        )
        return outputs, started - queued, infer_ns

    def _run_sync(
        self, feeds: dict[str, np.ndarray], output_names: list[str], deadline: float | None
    ) -> tuple[list[np.ndarray], int, int]:
        started = time.perf_counter_ns()
        # A request whose caller gave up while it queued never reaches the model.
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{self.describe()}: deadline passed while the request was queued")
        try:
            outputs = self._session.run(output_names, feeds)
        except Exception as err:
            raise Internal(f"{self.describe()}: onnxruntime failed: {err}") from None
        return outputs, started, time.perf_counter_ns() - started

    def close(self) -> None:
        """Stop accepting work; runs already handed to the executor finish."""
        self._executor.shutdown(wait=False)
