"""``ferry client generate``: a typed Python client module for the models of a server or a model repository.

Two steps: read each model's *signature* (its inputs and outputs, as ``ModelMetadata`` reports them), then render
one module from the signatures. The signatures come from a live server (``ModelMetadata`` + ``ModelConfig``) or,
offline, from a repository's ``config.pbtxt`` files::

    signatures = from_server("127.0.0.1:8001")  # or from_repository(Path("models"))
    Path("models_client.py").write_text(render(signatures))

The module holds, per model, a result dataclass (one field per output), a blocking class over ``client.Client``
and an asyncio one over ``client.AsyncClient``. Both call one shared ``_Model.request``, which checks every input's
dtype (``TypeError``) and shape (``ValueError``) before anything is sent. Names that are not Python identifiers
(``input.1``) or that are keywords (``class``) get a sanitized keyword or field name (``input_1``, ``class_``);
the generated code keeps the mapping. ``version`` is passed as given: a number or one of the model's version
labels (``"canary"``), which the server resolves.

Offline, a config that declares its inputs and outputs is taken as declared; one that does not is completed from
the latest version's ONNX graph by the server's own code (``ferry.server.models.modelconfig``,
``ferry.server.models.preprocess``), the one place here that needs the server installed.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.client import Client
from ferry.client.errors import FerryError
from ferry.client.tensors import DATATYPES

__all__ = ["CodegenError", "Signature", "Tensor", "add_arguments", "from_repository", "from_server", "render", "run"]

_BY_CONFIG_TYPE = {d.config_type: d for d in DATATYPES.values()}


class CodegenError(ValueError):
    """A model whose typed client cannot be generated (unknown model, unreadable config, unsupported type)."""


@dataclass(frozen=True, slots=True)
class Tensor:
    """An input or output as ``ModelMetadata`` reports it: ``shape`` includes the batch dimension, -1 = any."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Signature:
    """One model's inputs and outputs; ``versions`` are those served (documentation only: any may be asked)."""

    model: str
    versions: tuple[str, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


# ---- signatures from a live server ---------------------------------------------------------------------------


def from_server(target: str, models: Sequence[str] = (), timeout_s: float = 30.0) -> list[Signature]:
    """The signatures of ``models`` (default: every ready model, by name) from the server at ``target``."""
    with Client(target, timeout_s=timeout_s) as client:
        names = list(models) or sorted({entry.name for entry in client.repository_index(ready=True)})
        return [_from_metadata(client.model_metadata(name), client.model_config(name)) for name in names]


def _from_metadata(metadata: Any, config: Any) -> Signature:
    optional = {t.name for t in config.input if t.optional}

    def tensors(items: Iterable[Any], optional: set[str]) -> tuple[Tensor, ...]:
        return tuple(Tensor(t.name, t.datatype, tuple(t.shape), t.name in optional) for t in items)

    return Signature(
        metadata.name, tuple(metadata.versions), tensors(metadata.inputs, optional), tensors(metadata.outputs, set())
    )


# ---- signatures from a model repository (offline) ------------------------------------------------------------


def from_repository(root: Path, models: Sequence[str] = ()) -> list[Signature]:
    """The signatures of ``models`` (default: every model directory, by name) in the repository at ``root``."""
    if not root.is_dir():
        raise CodegenError(f"{root} is not a directory")
    found = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing = [name for name in models if name not in found]
    if missing:
        raise CodegenError(f"no model directories {missing} in {root}; it has {sorted(found)}")
    return [_from_directory(found[name]) for name in (list(models) or sorted(found))]


def _from_directory(path: Path) -> Signature:
    config_path = path / "config.pbtxt"
    config = mc.ModelConfig()
    if config_path.is_file():
        try:
            text_format.Parse(config_path.read_text(), config)
        except text_format.ParseError as err:
            raise CodegenError(f"{config_path}: {err}") from None
    filename = config.default_model_filename or "model.onnx"
    available = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / filename).is_file())
    versions = _served_versions(config, available)
    if not versions:
        raise CodegenError(f"model {path.name!r}: no served <version>/{filename} under {path}")
    if not config.input or not config.output:
        config = _complete(config, path, path / str(versions[-1]) / filename)
    batch = (-1,) if config.max_batch_size > 0 else ()

    def tensor(t: Any, optional: bool) -> Tensor:
        datatype = _BY_CONFIG_TYPE.get(mc.DataType.Name(t.data_type))
        if datatype is None:
            raise CodegenError(f"model {path.name!r} tensor {t.name!r}: unsupported {mc.DataType.Name(t.data_type)}")
        return Tensor(t.name, datatype.name, (*batch, *t.dims), optional)

    return Signature(
        path.name,
        tuple(str(v) for v in versions),
        tuple(tensor(t, t.optional) for t in config.input),
        tuple(tensor(t, False) for t in config.output),
    )


def _served_versions(config: Any, available: list[int]) -> list[int]:
    """The versions the config's policy serves (as ``ferry.server.models.modelconfig.select_versions`` picks them)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        return [v for v in available if v in policy.specific.versions]
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(count, 1) :]


def _complete(config: Any, model_dir: Path, model_file: Path) -> Any:
    """The config completed from the ONNX graph (and preprocess.json) exactly as the server completes it."""
    try:
        import onnxruntime as ort

        from ferry.server.models.modelconfig import GraphTensor, complete_config
        from ferry.server.models.preprocess import Pipeline
    except ImportError as err:
        raise CodegenError(
            f"model {model_dir.name!r}: config.pbtxt does not declare its inputs and outputs, and reading them from "
            f"the ONNX graph needs the Ferry server installed ({err}); declare them, or generate with --target"
        ) from None

    # as ferry.server.models.model reads a session's inputs and outputs
    def graph(args: list[Any]) -> list[GraphTensor]:
        return [
            GraphTensor(a.name, a.type, tuple(d if isinstance(d, int) and d >= 0 else None for d in a.shape))
            for a in args
        ]

    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        inputs = graph(session.get_inputs())
        pipeline = Pipeline.load(model_dir, config)
        if pipeline is not None:  # clients send what the preprocessing chain takes, not what the graph takes
            inputs = pipeline.client_inputs(inputs)
        return complete_config(config, model_dir.name, inputs, graph(session.get_outputs()))
    except FerryError as err:
        raise CodegenError(err.message) from None
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise CodegenError(f"onnxruntime cannot load {model_file}: {err}") from None


# ---- rendering -----------------------------------------------------------------------------------------------

_HEADER = '''\
"""Typed clients for the Ferry models {models}.

Generated by ``ferry client generate``: do not edit; regenerate when a model's inputs or outputs change. Each
model has a blocking class over ``client.Client`` and an asyncio one over ``client.AsyncClient``, whose ``infer``
takes the model's inputs as keyword arguments and checks each one's dtype (``TypeError``) and shape (``ValueError``)
before anything is sent::

    with Client("127.0.0.1:8001") as ferry:
        result = {example}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ferry.client import AsyncClient, Client
from ferry.client.tensors import DATATYPES

__all__ = [{exports}
]

_Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class _Input:
    """One input: its name on the wire, the keyword argument that carries it, its datatype and shape (-1: any)."""

    name: str
    keyword: str
    datatype: str
    shape: tuple[int, ...]

    def check(self, model: str, value: object) -> _Array:
        what = f"model {{model!r}} input {{self.name!r}}"
        if self.keyword != self.name:
            what += f" (keyword {{self.keyword}})"
        dtype = DATATYPES[self.datatype].dtype
        if not isinstance(value, np.ndarray):
            got = type(value).__name__
            raise TypeError(f"{{what}}: expected a numpy {{dtype}} array ({{self.datatype}}), got a {{got}}")
        if self.datatype == "BYTES":
            fits = value.dtype.kind in "OSU"
        else:  # any byte order: the SDK sends little-endian
            fits = (value.dtype.kind, value.dtype.itemsize) == (dtype.kind, dtype.itemsize)
        if not fits:
            raise TypeError(f"{{what}}: expected dtype {{dtype}} ({{self.datatype}}), got {{value.dtype}}")
        if value.ndim != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, value.shape, strict=True)
        ):
            raise ValueError(f"{{what}}: expected shape {{list(self.shape)}} (-1: any size), got {{list(value.shape)}}")
        return value


@dataclass(frozen=True, slots=True)
class _Model:
    """What a model's blocking and asyncio classes share: checking a call's arguments before it is sent."""

    name: str
    inputs: tuple[_Input, ...]
    outputs: tuple[str, ...]

    def request(
        self, values: Mapping[str, object], outputs: Sequence[str] | None
    ) -> tuple[dict[str, _Array], list[str] | None]:
        """The checked inputs by wire name (an optional input passed as None is left out), and the outputs asked."""
        inputs = {{t.name: t.check(self.name, values[t.keyword]) for t in self.inputs if values[t.keyword] is not None}}
        if outputs is None:
            return inputs, None
        if isinstance(outputs, str):
            raise TypeError(f"model {{self.name!r}}: outputs must be a sequence of output names, not one string")
        unknown = [name for name in outputs if name not in self.outputs]
        if unknown:
            raise ValueError(f"model {{self.name!r}} has no outputs {{unknown}}, only {{list(self.outputs)}}")
        return inputs, list(outputs)
'''

_MODEL = '''

{spec} = _Model(
    {model_str},
    {inputs},
    ({outputs}),
)


@dataclass(frozen=True, slots=True)
class {result}:
    """The outputs of ``{model}``{optional_note}."""

{fields}

    @classmethod
    def _from(cls, outputs: Mapping[str, _Array]) -> {result}:
        return cls({from_args})


class {sync}:
    """``{model}``{versions}, called through a blocking ``Client``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def infer(
        self,
        *,
{params}
    ) -> {result}:
        """Run ``{model}`` once; ``outputs`` selects outputs (default: all), ``version`` a version (default: latest).

{arg_docs}

        Raises TypeError (a wrong dtype) or ValueError (a wrong shape, an unknown output) before sending anything,
        and a ``ferry.client.errors.FerryError`` when the server fails the call.
        """
        inputs, selected = {spec}.request({values}, outputs)
        answer = self.client.infer({spec}.name, inputs, version, outputs=selected, timeout=timeout)
        return {result}._from(answer)


class {async_}:
    """``{model}``{versions}, called through an asyncio ``AsyncClient``."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def infer(
        self,
        *,
{params}
    ) -> {result}:
        """``{sync}.infer``, as a coroutine."""
        inputs, selected = {spec}.request({values}, outputs)
        answer = await self.client.infer({spec}.name, inputs, version, outputs=selected, timeout=timeout)
        return {result}._from(answer)
'''

# Names the generated module defines or imports at top level, and the names infer's body uses besides its inputs.
_MODULE_NAMES = frozenset(
    {"Any", "AsyncClient", "Client", "DATATYPES", "Literal", "Mapping", "Sequence", "dataclass", "np", "npt"}
    | {"_Array", "_Input", "_Model"}
)
_INFER_NAMES = frozenset({"self", "outputs", "version", "timeout", "inputs", "selected", "answer"})


def _identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for ``name``, not a keyword and not in ``taken`` (which it is added to)."""
    word = re.sub(r"\W", "_", name, flags=re.ASCII) or "_"
    if word[0].isdigit():
        word = "_" + word
    if keyword.iskeyword(word) or keyword.issoftkeyword(word) or word in taken:
        word += "_"
    base, n = word, 2
    while word in taken:
        word, n = f"{base}{n}", n + 1
    taken.add(word)
    return word


@dataclass(frozen=True, slots=True)
class _Names:
    """The generated names of one model: its class, and the keyword or field that carries each tensor."""

    cls: str
    inputs: list[str]
    outputs: list[str]

    @property
    def spec(self) -> str:
        return _module_names(self.cls)[-1]


def _module_names(cls: str) -> tuple[str, str, str, str]:
    """The blocking class, the asyncio class, the result class and the private ``_Model`` of one model."""
    return cls, f"Async{cls}", f"{cls}Result", f"_{cls.upper()}"


def _names(signature: Signature, taken: set[str]) -> _Names:
    """``my-model.v2`` -> ``MyModelV2``, unique case-insensitively among ``taken`` (module names so far)."""
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", signature.model) if p]
    base = "".join(p[0].upper() + p[1:] for p in parts) or "Model"
    if base[0].isdigit():
        base = "Model" + base
    cls, n = base, 2
    while {k.lower() for k in _module_names(cls)} & taken:
        cls, n = f"{base}{n}", n + 1
    taken.update(k.lower() for k in _module_names(cls))
    in_scope = set(_MODULE_NAMES | _INFER_NAMES | set(_module_names(cls)))  # what infer's body refers to
    fields = {"_from"}
    return _Names(
        cls,
        [_identifier(t.name, in_scope) for t in signature.inputs],
        [_identifier(t.name, fields) for t in signature.outputs],
    )


def _str(text: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are Python's too)."""
    return json.dumps(text)


def _doc(text: str) -> str:
    """``text`` made safe inside a triple-quoted docstring."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _scalar(datatype: str) -> str:
    """The numpy scalar type of an array of this datatype, for annotations (BYTES arrays hold objects)."""
    name = DATATYPES[datatype].dtype.type.__name__
    return "np.bool_" if name == "bool" else f"np.{name}"


def _input_type(datatype: str) -> str:
    if datatype == "BYTES":
        return "npt.NDArray[np.object_] | npt.NDArray[np.bytes_] | npt.NDArray[np.str_]"
    return f"npt.NDArray[{_scalar(datatype)}]"


def _describe(tensor: Tensor, word: str) -> str:
    wire = "" if word == tensor.name else f" (wire name {_doc(repr(tensor.name))})"
    return f"{tensor.datatype} {list(tensor.shape)}{wire}"


def _example(signature: Signature, names: _Names) -> str:
    def array(t: Tensor) -> str:
        shape = ", ".join(str(1 if d < 0 else d) for d in t.shape) + ("," if len(t.shape) == 1 else "")
        if t.datatype == "BYTES":
            return f'np.full(({shape}), b"", dtype=np.object_)'
        return f"np.zeros(({shape}), dtype={_scalar(t.datatype)})"

    args = [f"{k}={array(t)}" for t, k in zip(signature.inputs, names.inputs, strict=True) if not t.optional]
    return f"{names.cls}(ferry).infer({', '.join(args)})"


def _tuple(items: Sequence[str]) -> str:
    """A tuple expression as ruff formats it: one item a line when there are several."""
    if len(items) < 2:
        return f"({items[0]},)" if items else "()"
    return "(" + "".join(f"\n        {item}," for item in items) + "\n    )"


def _render_model(signature: Signature, names: _Names) -> str:
    inputs = list(zip(signature.inputs, names.inputs, strict=True))
    outputs = list(zip(signature.outputs, names.outputs, strict=True))
    selectable = len(outputs) > 1  # a single output is always answered, even to outputs=[]
    params = [
        f"{k}: {_input_type(t.datatype)}" + (" | None = None" if t.optional else "")
        for t, k in sorted(inputs, key=lambda pair: pair[0].optional)
    ]
    params += [
        f"outputs: Sequence[Literal[{', '.join(_str(t.name) for t in signature.outputs)}]] | None = None",
        "version: str | int | None = None",
        "timeout: float | None = None",
    ]
    field_type = "npt.NDArray[{}] | None" if selectable else "npt.NDArray[{}]"
    get = "outputs.get({})" if selectable else "outputs[{}]"
    versions = signature.versions
    return _MODEL.format(
        spec=names.spec,
        model=_doc(signature.model),
        model_str=_str(signature.model),
        inputs=_tuple([f"_Input({_str(t.name)}, {_str(k)}, {_str(t.datatype)}, {t.shape!r})" for t, k in inputs]),
        outputs=", ".join(_str(t.name) for t in signature.outputs) + ("," if len(outputs) == 1 else ""),
        result=f"{names.cls}Result",
        optional_note=": a field is None when ``outputs`` left it out" if selectable else "",
        fields="\n".join(f"    {f}: {field_type.format(_scalar(t.datatype))}  # {_describe(t, f)}" for t, f in outputs),
        from_args=", ".join(f"{f}={get.format(_str(t.name))}" for t, f in outputs),
        sync=names.cls,
        async_=f"Async{names.cls}",
        versions=f" (version{'s' if len(versions) > 1 else ''} {', '.join(versions)})" if versions else "",
        params="\n".join(f"        {p}," for p in params),
        arg_docs="\n".join(
            f"        {k}: {_describe(t, k)}, a numpy {DATATYPES[t.datatype].dtype} array"
            + (" (optional)" if t.optional else "")
            for t, k in inputs
        ),
        values="{" + ", ".join(f"{_str(k)}: {k}" for k in names.inputs) + "}",
    )


def render(signatures: Sequence[Signature]) -> str:
    """The typed client module for ``signatures`` (the same signatures always give the same text)."""
    if not signatures:
        raise CodegenError("no models to generate a client for")
    for s in signatures:
        for tensor in (*s.inputs, *s.outputs):
            if tensor.datatype not in DATATYPES:
                raise CodegenError(f"model {s.model!r} tensor {tensor.name!r}: unsupported datatype {tensor.datatype}")
    taken = {n.lower() for n in _MODULE_NAMES}
    names = [_names(s, taken) for s in signatures]
    header = _HEADER.format(
        models=", ".join(f"``{_doc(s.model)}``" for s in signatures),
        example=_example(signatures[0], names[0]),
        exports="".join(f"\n    {_str(e)}," for e in sorted(e for n in names for e in _module_names(n.cls)[:3])),
    )
    return header + "".join(_render_model(s, n) for s, n in zip(signatures, names, strict=True))


# ---- command line --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ferry client``'s subcommands (argparse only: nothing is read until ``run``)."""
    commands = parser.add_subparsers(dest="client_command", required=True)
    g = commands.add_parser("generate", help="write a typed Python client module for a server's models")
    g.description = "Write a typed Python client module: per model, a class whose infer() takes the model's inputs."
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--target", metavar="HOST:PORT", help="a live server: read each model's metadata and config")
    source.add_argument("--model-repository", type=Path, metavar="DIR", help="offline: read the repository's configs")
    g.add_argument("--model", nargs="+", action="extend", default=[], metavar="NAME", help="models (default: all)")
    g.add_argument("--out", type=Path, metavar="FILE", help="the module to write (default: standard output)")
    g.add_argument("--timeout-s", type=float, default=30.0, help="deadline of each call to --target (30 s)")


def run(args: argparse.Namespace) -> int:
    """The ``ferry client generate`` command; returns the exit status."""
    try:
        if args.target:
            signatures = from_server(args.target, args.model, args.timeout_s)
        else:
            signatures = from_repository(args.model_repository, args.model)
        text = render(signatures)
    except (CodegenError, FerryError) as err:
        print(f"ferry client generate: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}: {', '.join(s.model for s in signatures)}", file=sys.stderr)
    return 0
