"""Typed per-model clients (``ferry client generate``) against a real server serving the example repository.

The module is generated from the live server and offline from the repository (the two must be the same text),
type-checked with ``mypy --strict``, imported, and every model is called through it, blocking and asyncio, and
compared with the generic SDK's answer. The repository is the example one plus ``odd``, a model without a
config.pbtxt whose tensor names are not Python identifiers or clash with ``infer``'s own parameters.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ferry.client import AsyncClient, Client, InvalidArgument
from ferry.client.codegen import Signature, Tensor, render
from ferry.server.__main__ import main
from tests.models import IR_VERSION, OPSET
from tests.serving import BackgroundServer, background_server

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(13)


def write_odd(path: Path) -> None:
    """FP32 ``input.1`` [N, 3] -> ``out.1``; INT64 ``version`` [N, 3] -> ``class`` (both Identity)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input.1"], ["out.1"]), helper.make_node("Identity", ["version"], ["class"])],
        "odd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("version", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("out.1", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("class", TensorProto.INT64, ["batch", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path.parent.mkdir(parents=True)
    onnx.save_model(model, path)


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("codegen") / "models"
    shutil.copytree(example_repo, root)
    write_odd(root / "odd" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[BackgroundServer]:
    with background_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def generated(server: BackgroundServer, repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models_client.py`` from the live server; ``offline.py`` beside it from the repository."""
    out = tmp_path_factory.mktemp("generated")
    assert main(["client", "generate", "--target", server.address, "--out", str(out / "models_client.py")]) == 0
    assert main(["client", "generate", "--model-repository", str(repo), "--out", str(out / "offline.py")]) == 0
    return out / "models_client.py"


@pytest.fixture(scope="module")
def typed(generated: Path) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("models_client", generated)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_live_and_offline_generation_agree(generated: Path) -> None:
    assert generated.read_text() == (generated.parent / "offline.py").read_text()


def test_names_are_sanitized_and_the_mapping_kept(generated: Path) -> None:
    text = generated.read_text()
    assert '_Input("input.1", "input_1", "FP32", (-1, 3))' in text
    assert '_Input("version", "version_", "INT64", (-1, 3))' in text
    assert 'out_1=outputs.get("out.1"), class_=outputs.get("class")' in text


USAGE = """\
    import numpy as np

    from ferry.client import AsyncClient, Client
    from models_client import AsyncDigits, Digits, Odd, Tiny


    def use(ferry: Client) -> float:
        x = np.zeros((2, 64), dtype=np.float32)
        result = Digits(ferry).infer(input=x, outputs=["probabilities"], version=2)
        assert result.probabilities is not None  # an output of several may have been left out
        tiny = Tiny(ferry).infer(input=np.zeros((1, 16), dtype=np.float32)).output  # the only output: never None
        odd = Odd(ferry).infer(input_1=np.zeros((1, 3), dtype=np.float32), version_=np.zeros((1, 3), dtype=np.int64))
        Digits(ferry).infer(input=x, outputs=["probability"])  # type: ignore[list-item]
        Tiny(ferry).infer(inputs=x)  # type: ignore[call-arg]
        result.label.sum()  # type: ignore[union-attr]
        return float(result.probabilities.sum() + tiny.sum()) + float(odd.class_ is None)


    async def use_async(ferry: AsyncClient) -> bool:
        result = await AsyncDigits(ferry).infer(input=np.zeros((1, 64), dtype=np.float32), version="1")
        return result.label is not None
"""


def test_generated_module_passes_mypy_strict(generated: Path, tmp_path: Path) -> None:
    """The module, and code using it, pass ``mypy --strict``; the ``type: ignore`` lines prove that typos in
    output names, unknown keywords and unchecked optional outputs are caught (strict warns of unused ignores).
    Errors inside the SDK itself are ignored, as mypy ignores those of an installed package."""
    (generated.parent / "usage.py").write_text(textwrap.dedent(USAGE))
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nstrict = True\nignore_errors = True\n\n[mypy-models_client,usage]\nignore_errors = False\n"
    )
    command = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [*command, "models_client.py", "usage.py"],
        cwd=generated.parent,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 2 source files" in done.stdout


# model -> (class name, inputs by keyword, inputs by wire name)
def _cases() -> dict[str, tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    tiny = RNG.random((3, 16), dtype=np.float32)
    mlp = RNG.random((2, 256), dtype=np.float32)
    image = RNG.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    odd_x, odd_v = RNG.random((2, 3), dtype=np.float32), RNG.integers(0, 9, (2, 3), dtype=np.int64)
    return {
        "tiny": ("Tiny", {"input": tiny}, {"input": tiny}),
        "mlp": ("Mlp", {"input": mlp}, {"input": mlp}),
        "imgcls": ("Imgcls", {"image": image}, {"image": image}),
        "odd": ("Odd", {"input_1": odd_x, "version_": odd_v}, {"input.1": odd_x, "version": odd_v}),
    }


DIGITS = (RNG.random((4, 64)) * 16).astype(np.float32)


def _field(name: str) -> str:
    return {"out.1": "out_1", "class": "class_"}.get(name, name)


def _same(typed_result: Any, generic: dict[str, np.ndarray]) -> None:
    for name, expected in generic.items():
        np.testing.assert_allclose(getattr(typed_result, _field(name)), expected, rtol=1e-6)


def test_every_model_through_the_blocking_client(typed: ModuleType, client: Client) -> None:
    for model, (cls, by_keyword, by_name) in _cases().items():
        result = getattr(typed, cls)(client).infer(**by_keyword)
        assert type(result).__name__ == f"{cls}Result"
        _same(result, client.infer(model, by_name))
    for version in (1, 2):
        digits = typed.Digits(client)
        both = digits.infer(input=DIGITS, version=version)
        _same(both, client.infer("digits", {"input": DIGITS}, version))
        selected = digits.infer(input=DIGITS, version=str(version), outputs=["probabilities"])
        assert selected.label is None
        _same(selected, client.infer("digits", {"input": DIGITS}, version, outputs=["probabilities"]))
    v1, v2 = (typed.Digits(client).infer(input=DIGITS, version=v).probabilities for v in (1, 2))
    assert not np.allclose(v1, v2)  # the version argument reaches the server


def test_every_model_through_the_async_client(typed: ModuleType, client: Client, server: BackgroundServer) -> None:
    cases = _cases()

    async def calls() -> list[Any]:
        async with AsyncClient(server.address, timeout_s=60) as ferry:
            plain = [await getattr(typed, f"Async{cls}")(ferry).infer(**kw) for cls, kw, _ in cases.values()]
            digits = typed.AsyncDigits(ferry)
            chosen = [await digits.infer(input=DIGITS, version=v, outputs=["label"]) for v in (1, 2)]
            return plain + chosen

    results = asyncio.run(calls())
    for result, (model, (_, _, by_name)) in zip(results[: len(cases)], cases.items(), strict=True):
        _same(result, client.infer(model, by_name))
    for result, version in zip(results[-2:], (1, 2), strict=True):
        assert result.probabilities is None
        _same(result, client.infer("digits", {"input": DIGITS}, version, outputs=["label"]))


def _requests(client: Client, model: str) -> int:
    """Requests the server has answered for ``model``, failed ones included."""
    return sum(s.inference_stats.success.count + s.inference_stats.fail.count for s in client.statistics(model))


def test_wrong_inputs_fail_before_sending(typed: ModuleType, client: Client, server: BackgroundServer) -> None:
    tiny, odd, good = typed.Tiny(client), typed.Odd(client), np.zeros((2, 3), dtype=np.float32)
    before = {model: _requests(client, model) for model in ("tiny", "odd")}
    with pytest.raises(ValueError, match=r"model 'tiny' input 'input': expected shape \[-1, 16\].*got \[2, 15\]"):
        tiny.infer(input=np.zeros((2, 15), dtype=np.float32))
    with pytest.raises(ValueError, match=r"input 'input': expected shape \[-1, 16\].*got \[16\]"):
        tiny.infer(input=np.zeros(16, dtype=np.float32))
    with pytest.raises(TypeError, match=r"input 'input': expected dtype float32 \(FP32\), got float64"):
        tiny.infer(input=np.zeros((2, 16)))
    with pytest.raises(TypeError, match=r"input 'input': expected a numpy float32 array \(FP32\), got a list"):
        tiny.infer(input=[[0.0] * 16])
    with pytest.raises(TypeError, match=r"input 'version' \(keyword version_\): expected dtype int64 \(INT64\)"):
        odd.infer(input_1=good, version_=np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"has no outputs \['out'\], only \['out.1', 'class'\]"):
        odd.infer(input_1=good, version_=np.zeros((2, 3), dtype=np.int64), outputs=["out"])

    async def wrong_async() -> None:
        async with AsyncClient(server.address) as ferry:
            await typed.AsyncTiny(ferry).infer(input=np.zeros((2, 16), dtype=np.float16))

    with pytest.raises(TypeError, match=r"input 'input': expected dtype float32 \(FP32\), got float16"):
        asyncio.run(wrong_async())
    assert {model: _requests(client, model) for model in ("tiny", "odd")} == before
    # The count does move when such a request is sent: the generic SDK sends it, and the server rejects it.
    with pytest.raises(InvalidArgument, match="input 'input'"):
        client.infer("tiny", {"input": np.zeros((2, 15), dtype=np.float32)})
    assert _requests(client, "tiny") == before["tiny"] + 1


def test_generate_errors_name_the_problem(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "generate", "--model-repository", str(repo), "--model", "nope"]) == 2
    assert "no model directories ['nope']" in capsys.readouterr().err
    assert main(["client", "generate", "--model-repository", str(repo), "--model", "tiny"]) == 0
    assert "class Tiny:" in capsys.readouterr().out  # no --out: standard output


def test_awkward_names_bytes_and_optional_inputs() -> None:
    """Model and tensor names that clash with Python or with the module, a BYTES input and an optional one:
    rendered, run (against a stand-in client that records what would be sent), and named in errors."""
    odd = Signature(
        "3d-seg.v2",
        ("1",),
        (
            Tensor("self", "BYTES", (-1,)),
            Tensor("for", "FP32", (-1, 2), optional=True),
            Tensor("np", "BOOL", (2,)),
            Tensor("n.p", "BOOL", (2,)),
        ),
        (Tensor("mask", "UINT8", (-1, 2)),),
    )
    text = render([odd, Signature("client", (), (Tensor("x", "INT8", (1,)),), (Tensor("y", "INT8", (1,)),))])
    module: dict[str, Any] = {"__name__": "awkward"}
    sys.modules["awkward"] = ModuleType("awkward")
    try:
        exec(compile(text, "awkward.py", "exec"), module)
    finally:
        del sys.modules["awkward"]
    assert {"Model3dSegV2", "AsyncModel3dSegV2", "Client2", "Client2Result"} <= set(module["__all__"])

    class Recorder:
        def infer(self, model: str, inputs: dict[str, np.ndarray], version: Any, **options: Any) -> dict[str, Any]:
            self.sent = (model, inputs, version)
            return {"mask": np.ones((1, 2), dtype=np.uint8)}

    recorder, flags = Recorder(), np.array([True, False])
    result = module["Model3dSegV2"](recorder).infer(self_=np.array([b"a"], dtype=object), np_=flags, n_p=flags)
    assert result.mask.tolist() == [[1, 1]]
    assert recorder.sent[0] == "3d-seg.v2" and set(recorder.sent[1]) == {"self", "np", "n.p"}  # "for" left out
    with pytest.raises(TypeError, match=r"model '3d-seg.v2' input 'for' \(keyword for_\): expected dtype float32"):
        module["Model3dSegV2"](recorder).infer(self_=np.array(["a"]), for_=np.zeros((1, 2)), np_=flags, n_p=flags)
