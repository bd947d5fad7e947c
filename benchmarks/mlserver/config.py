"""MLServer settings folders for the example models, and the ModelConfig answers its perf_analyzer shim serves.

Pure Python, no MLServer import: it runs in Ferry's venv and writes what MLServer (in its own venv) reads:

    FOLDER/settings.json                 server settings (debug, metrics, parallel_workers, dirs)
    FOLDER/onnx_runtime.py               the runtime (a copy of benchmarks/mlserver/onnx_runtime.py)
    FOLDER/<model>/model-settings.json   implementation, uri of examples/models/<model>/1/model.onnx,
                                         adaptive batching (max_batch_size, max_batch_time)
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from google.protobuf import text_format

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import model_config_pb2 as mc

HERE = Path(__file__).resolve().parent
RUNTIME = "onnx_runtime.OnnxRuntime"


@dataclass(frozen=True, slots=True)
class MLServerConfig:
    """The knobs that move MLServer's throughput. ``max_batch_size`` <= 1 or ``max_batch_time`` 0: batching off."""

    max_batch_size: int = 64
    max_batch_time: float = 0.002  # seconds, as MLServer counts it
    parallel_workers: int = 0  # 0: the model runs in the server process; N: N worker processes (MLServer default 1)
    debug: bool = False  # MLServer's default is true: a logging interceptor on every gRPC call
    metrics: bool = False  # MLServer's default is on: a Prometheus interceptor and a metrics server
    intra_op_threads: int = 0  # 0: all cores (Ferry's default for one instance)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1 and self.max_batch_time > 0

    def label(self) -> str:
        batching = f"batch {self.max_batch_size} / {self.max_batch_time * 1e3:g} ms" if self.batching else "no batching"
        parts = [batching, f"workers {self.parallel_workers}"]
        parts += ["debug on"] if self.debug else []
        parts += ["metrics on"] if self.metrics else []
        parts += [f"intra-op {self.intra_op_threads}"] if self.intra_op_threads else []
        return ", ".join(parts)

    def with_(self, **changes: object) -> MLServerConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


# The best configuration with batching on found by `python -m benchmarks.mlserver.compare --sweep` on this machine
# (2026-11-26, see BENCHMARKS.md): parallel_workers 0 clearly beat 1 and 2; the batching knobs, intra-op threads,
# debug and metrics moved throughput by less than the machine's noise, and MLServer without batching was faster.
BEST = MLServerConfig(max_batch_size=16, max_batch_time=0.001, intra_op_threads=1)

# What --sweep tries, in two stages: batching knobs with everything else at BEST's values, then the server knobs
# on the best batching (measured again beside them). Each entry overrides BEST.
SWEEP_BATCHING: tuple[dict[str, object], ...] = (
    {"max_batch_size": 1, "max_batch_time": 0.0},
    {"max_batch_size": 16, "max_batch_time": 0.001},
    {"max_batch_size": 32, "max_batch_time": 0.001},
    {"max_batch_size": 64, "max_batch_time": 0.001},
    {"max_batch_size": 64, "max_batch_time": 0.002},
    {"max_batch_size": 32, "max_batch_time": 0.005},
    {"max_batch_size": 64, "max_batch_time": 0.005},
    {"max_batch_size": 64, "max_batch_time": 0.01},
)
SWEEP_SERVER: tuple[dict[str, object], ...] = (
    {"parallel_workers": 1},  # MLServer's default: one worker process, requests cross a multiprocessing queue
    {"parallel_workers": 2},
    {"debug": True, "metrics": True},  # MLServer's defaults for both
    {"intra_op_threads": 1},
    {"intra_op_threads": 2},
)


def write_folder(models: Path, names: Iterable[str], folder: Path, config: MLServerConfig) -> Path:
    """Write an MLServer settings folder serving ``models/<name>/1/model.onnx`` for each name; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "onnx_runtime.py", folder / "onnx_runtime.py")
    server = {
        "debug": config.debug,
        "parallel_workers": config.parallel_workers,
        "metrics_endpoint": "/metrics" if config.metrics else None,
        "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"),
        "load_models_at_startup": True,
    }
    (folder / "settings.json").write_text(json.dumps(server, indent=2) + "\n")
    for name in names:
        onnx = (models / name / "1" / "model.onnx").resolve()
        if not onnx.is_file():
            raise FileNotFoundError(f"{onnx}: no such model file")
        extra: dict[str, object] = {}
        if config.intra_op_threads:
            extra["intra_op_threads"] = config.intra_op_threads
        model = {
            "name": name,
            "implementation": RUNTIME,
            **_metadata(models / name / "config.pbtxt"),
            "parameters": {"uri": str(onnx), "version": "1", "extra": extra},
            "max_batch_size": config.max_batch_size if config.batching else 0,
            "max_batch_time": config.max_batch_time if config.batching else 0.0,
        }
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(model, indent=2) + "\n")
    return folder


def _read_config(path: Path, name: str) -> mc.ModelConfig:
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.name = config.name or name
    return config


def _metadata(path: Path) -> dict[str, object]:
    """MLServer's ``inputs`` / ``outputs`` model metadata from a Triton config.pbtxt (perf_analyzer reads them)."""
    config = _read_config(path, path.parent.name)
    batch = [-1] if config.max_batch_size > 0 else []

    def tensors(items: Iterable[mc.ModelInput] | Iterable[mc.ModelOutput]) -> list[dict[str, object]]:
        return [
            {
                "name": t.name,
                "datatype": mc.DataType.Name(t.data_type).removeprefix("TYPE_"),
                "shape": [*batch, *t.dims],
            }
            for t in items
        ]

    return {"inputs": tensors(config.input), "outputs": tensors(config.output)}


def model_configs(models: Path, names: Iterable[str]) -> dict[str, str]:
    """{name: base64 of a serialized ModelConfigResponse} from each model's config.pbtxt, for launch.py's shim."""
    out = {}
    for name in names:
        config = _read_config(models / name / "config.pbtxt", name)
        out[name] = base64.b64encode(pb.ModelConfigResponse(config=config).SerializeToString()).decode()
    return out


def describe(config: MLServerConfig) -> dict[str, object]:
    return {**asdict(config), "label": config.label()}
