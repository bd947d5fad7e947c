"""``config.pbtxt``: parsing, completion from the ONNX graph, tensor specs and version policy.

Pure functions over ``ModelConfig`` messages (Triton's ``model_config.proto``), so they are unit-tested without a
server. The completed config is what ``ModelConfig`` answers and what request validation checks against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import text_format

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import DATATYPES, Datatype
from ferry.server.models.batching import BatchPolicy, LevelPolicy

PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE = 64
"""max_batch_size given to a model whose config does not declare its tensors and whose graph has a dynamic
first dimension on every input and output (Triton's autocompletion does the same, with a default of 4)."""

ONNX_TYPES: dict[str, Datatype] = {
    "tensor(bool)": DATATYPES["BOOL"],
    "tensor(uint8)": DATATYPES["UINT8"],
    "tensor(uint16)": DATATYPES["UINT16"],
    "tensor(uint32)": DATATYPES["UINT32"],
    "tensor(uint64)": DATATYPES["UINT64"],
    "tensor(int8)": DATATYPES["INT8"],
    "tensor(int16)": DATATYPES["INT16"],
    "tensor(int32)": DATATYPES["INT32"],
    "tensor(int64)": DATATYPES["INT64"],
    "tensor(float16)": DATATYPES["FP16"],
    "tensor(float)": DATATYPES["FP32"],
    "tensor(double)": DATATYPES["FP64"],
    "tensor(string)": DATATYPES["BYTES"],
}
_BY_CONFIG_TYPE = {d.config_type: d for d in DATATYPES.values()}


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """An input or output as the ONNX graph declares it (dims: int, or None when symbolic/unknown)."""

    name: str
    onnx_type: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output as clients see it. ``dims`` exclude the batch dimension of a batching model;
    -1 accepts any size."""

    name: str
    datatype: Datatype
    dims: tuple[int, ...]
    optional: bool = False
    wire: tuple[int, ...] = ()  # the full request shape (batch dimension as -1), precomputed for validation
    fixed: list[int] | None = None  # the wire shape after the batch dimension when it has no -1 (a fast check)

    def wire_shape(self, max_batch_size: int) -> list[int]:
        """The shape ModelMetadata reports: a leading -1 for the batch dimension of a batching model."""
        return [-1, *self.dims] if max_batch_size > 0 else list(self.dims)


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text; a syntax error or unknown field names the file, line and column."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as err:
        raise InvalidArgument(f"{where}: {err}") from None


def complete_config(
    config: mc.ModelConfig, model_name: str, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]
) -> mc.ModelConfig:
    """A copy of ``config`` with what it leaves out taken from the ONNX graph, checked against the graph."""
    done = mc.ModelConfig()
    done.CopyFrom(config)
    if not done.name:
        done.name = model_name
    elif done.name != model_name:
        raise InvalidArgument(f"config name {done.name!r} differs from the model directory name {model_name!r}")
    if done.backend not in ("", "onnxruntime") or done.platform not in ("", PLATFORM):
        raise InvalidArgument(
            f"model {model_name!r}: Ferry serves ONNX models only "
            f"(platform {done.platform!r}, backend {done.backend!r})"
        )
    if not done.platform and not done.backend:
        done.platform = PLATFORM
    graph = [*inputs, *outputs]
    batchable = bool(graph) and all(t.shape and t.shape[0] is None for t in graph)
    if not done.input and not done.output and done.max_batch_size == 0 and batchable:
        done.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    if done.max_batch_size < 0:
        raise InvalidArgument(f"model {model_name!r}: max_batch_size must be >= 0, got {done.max_batch_size}")
    if done.max_batch_size > 0 and not batchable:
        fixed = [t.name for t in graph if not t.shape or t.shape[0] is not None]
        raise InvalidArgument(
            f"model {model_name!r}: max_batch_size {done.max_batch_size} needs a dynamic first dimension on "
            f"every graph input and output, but {fixed} have none"
        )
    if not done.input:
        for t in inputs:
            data_type, dims = _graph_fields(t, done, model_name)
            done.input.add(name=t.name, data_type=data_type, dims=dims)
    if not done.output:
        for t in outputs:
            data_type, dims = _graph_fields(t, done, model_name)
            done.output.add(name=t.name, data_type=data_type, dims=dims)
    _check_against_graph(done.input, inputs, "input", done, model_name, require_all=True)
    _check_against_graph(done.output, outputs, "output", done, model_name, require_all=False)
    return done


def _graph_fields(tensor: GraphTensor, config: mc.ModelConfig, model_name: str) -> tuple[int, list[int]]:
    """The config data_type and dims (batch dimension dropped for a batching model) of a graph tensor."""
    datatype = ONNX_TYPES.get(tensor.onnx_type)
    if datatype is None:
        raise InvalidArgument(f"model {model_name!r}: tensor {tensor.name!r} has unsupported type {tensor.onnx_type}")
    shape = tensor.shape[1:] if config.max_batch_size > 0 else tensor.shape
    return mc.DataType.Value(datatype.config_type), [-1 if d is None else d for d in shape]


def _check_against_graph(
    declared: Iterable[mc.ModelInput] | Iterable[mc.ModelOutput],
    graph: Sequence[GraphTensor],
    kind: str,
    config: mc.ModelConfig,
    model_name: str,
    require_all: bool,
) -> None:
    by_name = {t.name: t for t in graph}
    seen: set[str] = set()
    for tensor in declared:
        where = f"model {model_name!r} {kind} {tensor.name!r}"
        if tensor.name in seen:
            raise InvalidArgument(f"{where}: declared twice in config.pbtxt")
        seen.add(tensor.name)
        found = by_name.get(tensor.name)
        if found is None:
            raise InvalidArgument(f"{where}: not in the ONNX graph, whose {kind}s are {sorted(by_name)}")
        if tensor.HasField("reshape"):
            raise InvalidArgument(f"{where}: reshape is not supported")
        graph_type, graph_dims = _graph_fields(found, config, model_name)
        if tensor.data_type != graph_type:
            raise InvalidArgument(
                f"{where}: config says {mc.DataType.Name(tensor.data_type)}, "
                f"the graph says {mc.DataType.Name(graph_type)}"
            )
        if len(tensor.dims) != len(graph_dims) or any(
            c != g and c != -1 and g != -1 for c, g in zip(tensor.dims, graph_dims, strict=True)
        ):
            raise InvalidArgument(f"{where}: config dims {list(tensor.dims)} do not fit graph dims {graph_dims}")
        # Where the graph fixes a size the config left open, the graph's size is the truth.
        tensor.dims[:] = [g if c == -1 else c for c, g in zip(tensor.dims, graph_dims, strict=True)]
    missing = sorted(set(by_name) - seen)
    if require_all and missing:
        raise InvalidArgument(f"model {model_name!r}: config.pbtxt lacks graph {kind}s {missing}")


def tensor_specs(config: mc.ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The input and output specs of a completed config, in declaration order."""

    def spec(tensor: mc.ModelInput | mc.ModelOutput, optional: bool) -> TensorSpec:
        datatype = _BY_CONFIG_TYPE.get(mc.DataType.Name(tensor.data_type))
        if datatype is None:
            raise InvalidArgument(
                f"model {config.name!r} tensor {tensor.name!r}: unsupported {mc.DataType.Name(tensor.data_type)}"
            )
        dims = tuple(tensor.dims)
        wire = (-1, *dims) if config.max_batch_size > 0 else dims
        fixed = list(dims) if -1 not in dims else None
        return TensorSpec(tensor.name, datatype, dims, optional, wire, fixed)

    return [spec(t, t.optional) for t in config.input], [spec(t, False) for t in config.output]


def select_versions(config: mc.ModelConfig, available: Sequence[int]) -> tuple[list[int], dict[int, str]]:
    """Versions the policy serves, and the versions it names that do not exist (with the reason)."""
    policy = config.version_policy
    ordered = sorted(available)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ordered, {}
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = {v: f"version {v} named by version_policy has no model file" for v in wanted if v not in ordered}
        return [v for v in wanted if v in ordered], missing
    count = policy.latest.num_versions if choice == "latest" else 1
    if count < 1:
        raise InvalidArgument(f"model {config.name!r}: version_policy latest num_versions must be >= 1")
    return ordered[-count:], {}


def instance_count(config: mc.ModelConfig) -> int:
    """Batches of one version that may run at once: the sum of ``instance_group`` counts (default 1)."""
    return sum(max(g.count, 1) for g in config.instance_group) or 1


def batch_policy(config: mc.ModelConfig, default_max_queue_size: int) -> BatchPolicy:
    """How a completed config queues and batches: Triton's ``dynamic_batching`` block, or one request per run.

    A level's ``max_queue_size`` of 0 (Triton: unbounded) becomes ``default_max_queue_size``: every queue is bounded.
    Without ``priority_levels`` there is one level; a ``default_priority_level`` of 0 means the lowest level."""
    where = f"model {config.name!r} dynamic_batching"
    mbs = config.max_batch_size
    batching = config.HasField("dynamic_batching") and mbs > 0
    db = config.dynamic_batching
    count = max(1, db.priority_levels)

    def level(queue: mc.ModelQueuePolicy) -> LevelPolicy:
        timeout_s = queue.default_timeout_microseconds / 1e6 if queue.default_timeout_microseconds else None
        return LevelPolicy(
            max_queue_size=queue.max_queue_size or default_max_queue_size,
            timeout_s=timeout_s,
            delay_on_timeout=queue.timeout_action == mc.ModelQueuePolicy.DELAY,
            allow_timeout_override=queue.allow_timeout_override or timeout_s is None,
        )

    for size in db.preferred_batch_size:
        if not 1 <= size <= max(mbs, 1):
            raise InvalidArgument(f"{where}: preferred_batch_size {size} is outside 1..{mbs} (max_batch_size)")
    for key in db.priority_queue_policy:
        if not 1 <= key <= count:
            raise InvalidArgument(f"{where}: priority_queue_policy names level {key}, outside 1..{count}")
    if db.default_priority_level > count:
        raise InvalidArgument(f"{where}: default_priority_level {db.default_priority_level} is outside 1..{count}")
    levels = tuple(level(db.priority_queue_policy.get(i, db.default_queue_policy)) for i in range(1, count + 1))
    return BatchPolicy(
        batching=batching,
        max_batch_rows=max(mbs, 1),
        preferred_rows=tuple(db.preferred_batch_size),
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
        levels=levels,
        default_level=db.default_priority_level or count,
        instances=instance_count(config),
        priorities=db.priority_levels > 0,
    )
