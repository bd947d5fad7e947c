"""The two distributions: ``ferry`` (the server, built from the repository root) and ``ferry-client`` (the SDK, built
from ``client/``), both installing under the one ``ferry`` namespace.

Both wheels are built from a copy of the checkout (no build directories left in the tree, nothing stale from an
earlier build) with ``.venv``'s setuptools and no network (``--no-build-isolation``), and their file lists checked.
Then ferry-client's wheel goes into a fresh venv (no system site-packages, no pip) from a folder holding only it and
its dependencies' wheels, the one step that needs a package index (``pip download`` of the exact grpcio, protobuf
and numpy releases ``.venv`` holds: pip's cache, a local index or PyPI). Without one the test skips, saying why, except
under ``CI=true``, where it fails. The fresh venv's Python then calls a live server and checks that neither
onnxruntime, numba nor any ``ferry.server`` module is installed or imported.
"""

from __future__ import annotations

import ast
import email.message
import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort
import pytest

from tests.serving import background_server

ROOT = Path(__file__).resolve().parents[2]
WIRE = ("grpcio", "protobuf", "numpy")
"""ferry-client's dependencies, all of them."""
SERVER_PACKAGES = ("server", "kernels", "loadtest")
"""The server distribution's folders, installed as ferry.server, ferry.kernels and ferry.loadtest."""
DATA_FILES = {"server": {"api/openapi.yaml"}}
"""Files other than modules each folder ships (pyproject.toml's package-data)."""

_NOT_COPIED = {
    ".git",
    ".venv",
    ".venv-mlserver",
    ".venv-kserve",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "node_modules",
    "bench-out",
}


def missing(what: str) -> NoReturn:
    """Skip the test for a missing package index, or fail it under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the packaging tests must run in CI: {what}")
    pytest.skip(what)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return canonical(match.group(0))


def pyproject(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def run(*command: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _ignore(directory: str, names: list[str]) -> set[str]:
    skipped = {name for name in names if name in _NOT_COPIED or name.endswith(".egg-info")}
    if Path(directory).resolve() == ROOT / "examples":
        skipped.add("models")
    return skipped


def py_files(folder: Path) -> set[str]:
    """The Python sources (and stubs) under ``folder``, relative to it, build outputs left out."""
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*.py*")
        if path.suffix in (".py", ".pyi") and not {"build", "__pycache__"} & set(path.relative_to(folder).parts)
    }


def metadata(wheel: zipfile.ZipFile, dist_info: str) -> email.message.Message:
    return email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout (its ferry/ symlinks kept as links) without caches, build outputs or virtual envs."""
    copy = tmp_path_factory.mktemp("packaging") / "ferry"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=_ignore)
    return copy


@pytest.fixture(scope="module")
def wheels(source: Path) -> dict[str, Path]:
    """``{"ferry": server wheel, "ferry-client": client wheel}``, built offline with .venv's setuptools."""
    out = source.parent / "wheels"
    built: dict[str, Path] = {}
    for name, project in (("ferry-client", source / "client"), ("ferry", source)):
        before = set(out.glob("*.whl"))
        run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--check-build-dependencies",
            "-w",
            out,
            project,
            timeout=120,
        )
        (wheel,) = set(out.glob("*.whl")) - before
        assert wheel.name.startswith(f"{canonical(name).replace('-', '_')}-"), wheel.name
        built[name] = wheel
    return built


def test_versions_and_dependencies_agree() -> None:
    """ferry-client is versioned with the server, which pins it exactly; both ask the same of grpcio, protobuf and
    numpy, and the client asks nothing else."""
    server = pyproject(ROOT / "pyproject.toml")["project"]
    client = pyproject(ROOT / "client" / "pyproject.toml")["project"]
    assert client["name"] == "ferry-client"
    assert client["version"] == server["version"]
    assert f"ferry-client=={server['version']}" in server["dependencies"]
    assert sorted(client["dependencies"]) == sorted(r for r in server["dependencies"] if requirement_name(r) in WIRE)
    assert {requirement_name(r) for r in client["dependencies"]} == set(WIRE)


def test_server_wheel_installs_everything_under_ferry(source: Path, wheels: dict[str, Path]) -> None:
    version = pyproject(ROOT / "pyproject.toml")["project"]["version"]
    dist_info = f"ferry-{version}.dist-info"
    with zipfile.ZipFile(wheels["ferry"]) as wheel:
        names = wheel.namelist()
        meta = metadata(wheel, dist_info)
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    # no top-level server/ client/ kernels/ loadtest/ benchmarks/ tests/: only the namespace and the metadata
    assert {name.split("/")[0] for name in names} == {"ferry", dist_info}
    assert "ferry/__init__.py" not in names  # `ferry` stays a namespace package, shared with ferry-client
    assert not [name for name in names if name.startswith("ferry/client/")], "ferry.client is ferry-client's"
    shipped = {name.split("/")[1] for name in names if name.startswith("ferry/")}
    assert shipped == set(SERVER_PACKAGES)
    for package in SERVER_PACKAGES:  # every module of every subpackage, nothing else
        in_wheel = {name.removeprefix(f"ferry/{package}/") for name in names if name.startswith(f"ferry/{package}/")}
        assert in_wheel == py_files(source / package) | DATA_FILES.get(package, set()), package
    for module in ("ferry/server/__main__.py", "ferry/server/app.py", "ferry/kernels/__init__.py"):
        assert module in names
    assert f"ferry-client=={version}" in (meta.get_all("Requires-Dist") or [])
    assert re.search(r"^ferry = ferry\.server\.__main__:main$", entry_points, re.MULTILINE), entry_points


def test_client_wheel_holds_the_sdk_only(source: Path, wheels: dict[str, Path]) -> None:
    version = pyproject(ROOT / "client" / "pyproject.toml")["project"]["version"]
    dist_info = f"ferry_client-{version}.dist-info"
    with zipfile.ZipFile(wheels["ferry-client"]) as wheel:
        names = wheel.namelist()
        meta = metadata(wheel, dist_info)
    assert {name.split("/")[0] for name in names} == {"ferry", dist_info}
    package = {name.removeprefix("ferry/client/") for name in names if not name.startswith(dist_info)}
    assert all(name.startswith("ferry/client/") for name in names if not name.startswith(dist_info))
    stubs = {f"_proto/{path.name}" for path in (source / "client" / "_proto").glob("*.pyi")}
    assert stubs, "the generated stubs are committed beside the generated code"
    assert package == py_files(source / "client") | {"py.typed"}
    assert stubs <= package
    requires = meta.get_all("Requires-Dist") or []
    assert {requirement_name(r) for r in requires} == set(WIRE), requires


def test_client_code_imports_the_server_only_lazily_in_codegen() -> None:
    """No module of client/ imports the server, onnxruntime or numba when imported: only codegen's offline path
    (``--model-repository``) reads a repository with the server's own code, importing it inside the function."""
    heavy = ("server", "onnxruntime", "numba")  # server: the pre-namespace name
    lazy: list[str] = []
    for path in sorted((ROOT / "client").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        inside = {id(node) for function in functions for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in heavy or module == "ferry.server" or module.startswith("ferry.server."):
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {module}"
                    assert id(node) in inside and path.name == "codegen.py", f"the client imports the server: {where}"
                    lazy.append(where)
    assert lazy, "codegen's offline path reads the repository with the server's code"


CLIENT_ONLY = """
import asyncio, importlib, importlib.metadata, importlib.util, json, pkgutil, sys

import numpy as np

import ferry.client
from ferry.client import AsyncClient, Client

address = sys.argv[1]
x = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
with Client(address, timeout_s=10.0) as client:
    assert client.server_ready() and client.model_ready("tiny")
    output = client.infer("tiny", {"input": x})["output"]


async def infer_async():
    async with AsyncClient(address, timeout_s=10.0) as client:
        return (await client.infer("tiny", {"input": x}))["output"]


np.testing.assert_array_equal(asyncio.run(infer_async()), output)
# every module of the SDK imports without the server (codegen imports it in its offline path only, when used)
modules = [info.name for info in pkgutil.walk_packages(ferry.client.__path__, "ferry.client.")]
for name in modules:
    importlib.import_module(name)

for absent in ("onnxruntime", "numba", "ferry.server"):
    assert importlib.util.find_spec(absent) is None, absent
try:
    import ferry.server
except ModuleNotFoundError:
    pass
else:
    raise AssertionError(f"ferry.server is importable: {ferry.server}")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("onnxruntime", "numba") or m.startswith("ferry.server"))
assert not loaded, loaded

print(json.dumps({
    "output": output.tolist(),
    "dtype": str(output.dtype),
    "client": ferry.client.__file__,
    "modules": modules,
    "distributions": sorted(dist.metadata["Name"] for dist in importlib.metadata.distributions()),
}))
"""


def dependency_closure(names: tuple[str, ...]) -> set[str]:
    """``names`` and what they need (extras left out), as installed in this environment."""
    closure: set[str] = set()
    todo = [canonical(name) for name in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(requirement_name(requirement))
    return closure


@pytest.fixture(scope="module")
def fresh_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv holding ferry-client and its dependencies only, installed from a folder of wheels with --no-index."""
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    shutil.copy(wheels["ferry-client"], wheelhouse)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in WIRE]
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheelhouse), *pinned],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if download.returncode != 0:
        missing(f"no package index to download {' '.join(pinned)} from: {download.stderr.strip()[-500:]}")
    venv = tmp_path_factory.mktemp("client-only") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)  # no --system-site-packages: nothing of .venv's
    python = venv / "bin" / "python"
    # pip of .venv installs into the fresh venv; no configuration, no index: the wheelhouse is the only source
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-index",
        "--find-links",
        wheelhouse,
        "ferry-client",
        env=env,
        timeout=120,
    )
    yield python


def test_ferry_client_alone_calls_a_live_server(fresh_venv: Path, example_repo: Path, tmp_path: Path) -> None:
    script = tmp_path / "client_only.py"
    script.write_text(CLIENT_ONLY)
    with background_server(example_repo) as server:
        # -I: no PYTHON* variables, no user site-packages, not the script's folder or the checkout on sys.path
        done = subprocess.run(
            [str(fresh_venv), "-I", str(script), server.address],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout)

    assert Path(seen["client"]).is_relative_to(fresh_venv.parent.parent), seen["client"]  # the wheel, not client/
    assert {"ferry.client.client", "ferry.client.codegen", "ferry.client._proto.grpc_service_pb2"} <= set(
        seen["modules"]
    )
    installed = {canonical(name) for name in seen["distributions"]}
    assert {"ferry-client", *WIRE} <= installed <= {"ferry-client"} | dependency_closure(WIRE), installed
    assert not installed & {"ferry", "onnxruntime", "numba"}

    x = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
    session = ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x})
    assert seen["dtype"] == "float32"
    np.testing.assert_allclose(np.asarray(seen["output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
