"""Ferry's container image (Containerfile, deploy/container/).

- The baked Numba cache: ``deploy/container/warm_numba.py`` (what the image build runs) warms a cache folder, then a
  ``ferry serve`` over the example repository with that cache compiles nothing: every kernel specialization its
  models use was baked. Runs everywhere (no podman needed).
- The image itself (opt-in, ``FERRY_CONTAINER_TEST=1``: the first build takes minutes and needs root, debootstrap, a
  Debian mirror and PyPI): ``deploy/container/build.sh`` builds it (cached), ``podman run`` serves the example
  repository mounted at /models, and tritonclient's gRPC client gets the same answers onnxruntime gives here; the
  server runs as the image's non-root user, serving compiled no kernel, the image's HEALTHCHECK passes, and
  ``podman stop`` (SIGTERM) ends it with exit code 0. Then the image runs with the Kubernetes Deployment's arguments
  and model mount, and SIGTERM ends it with exit code 0 within the pod's grace period. Skips, saying why, where
  podman cannot run containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.serving import FerryProcess, free_port, wait_serving
from tests.unit.test_manifests import containers, flag_values, one

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "container"
OPT_IN = "FERRY_CONTAINER_TEST"


def newer_than(folder: Path, stamp: Path) -> list[str]:
    """Files under ``folder`` written after ``stamp`` (Numba rewrites an index and adds a file per compilation)."""
    since = stamp.stat().st_mtime
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime > since)


def test_the_baked_numba_cache_covers_the_example_models(
    example_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "numba"
    for name, value in {"NUMBA_CACHE_DIR": str(cache), "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": ""}.items():
        monkeypatch.setenv(name, value)
    # the server below runs `python -m ferry.server` from ROOT: import the kernels from the same files (Numba's cache
    # is keyed by the source file's path, as it is in the image, where both use site-packages)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    warmed = subprocess.run(
        [sys.executable, str(HERE / "warm_numba.py")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert warmed.returncode == 0, warmed.stderr
    stamp = cache / ".warmed"
    stamp.touch()
    assert list(cache.rglob("*.nbi")), "the warm-up wrote no cache index"
    time.sleep(0.05)  # mtimes below must be able to differ from the stamp's
    server = FerryProcess(example_repo, log=tmp_path / "serve.log")
    server.start()
    server.stop()
    assert newer_than(cache, stamp) == [], "serving the examples compiled kernels the image build did not bake"


# ---- the image, with podman (opt-in)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"opt-in: {OPT_IN}=1 builds and runs the image (deploy/container/build.sh; minutes the first time)")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman)")
    built = subprocess.run(["sh", str(HERE / "build.sh")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if built.returncode == 3:  # a missing tool or privilege, named by build.sh
        pytest.skip(built.stderr.strip().splitlines()[-1])
    if "podman-flags.sh: podman cannot run a container" in built.stderr:
        pytest.skip("podman cannot run containers here: " + built.stderr.split("podman said:", 1)[-1].strip())
    assert built.returncode == 0, built.stderr[-4000:]
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_flags() -> list[str]:
    return subprocess.run(
        ["sh", str(HERE / "podman-flags.sh")], capture_output=True, text=True, check=True
    ).stdout.split()


@pytest.fixture(scope="module")
def container(image: str, run_flags: list[str], example_repo: Path) -> Iterator[tuple[str, str, int]]:
    """(name, gRPC address, HTTP port) of the image serving the example repository, read-only at /models."""
    name = f"ferry-test-{os.getpid()}"
    grpc_port, http_port = free_port(), free_port()
    podman(
        "run", "--detach", "--name", name, *run_flags,
        "--publish", f"127.0.0.1:{grpc_port}:8001", "--publish", f"127.0.0.1:{http_port}:8000",
        "--volume", f"{example_repo.resolve()}:/models:ro", image,
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", timeout_s=300)
        yield name, f"127.0.0.1:{grpc_port}", http_port
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.mark.timeout(2400)
def test_the_image_is_configured_as_the_containerfile_says(image: str) -> None:
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["ferry", "serve"]
    assert config["Config"]["Cmd"] == ["--model-repository", "/models", "--host", "0.0.0.0"]
    assert set(config["Config"]["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
    # only the Docker image format keeps a HEALTHCHECK (podman drops it from OCI images)
    check = config["Healthcheck"]["Test"]
    assert check[:3] == ["CMD", "python3", "-c"] and "/v2/health/ready" in check[3]


@pytest.mark.timeout(2400)
def test_the_container_serves_tritonclient_calls(container: tuple[str, str, int], example_repo: Path) -> None:
    import tritonclient.grpc as triton

    name, address, _ = container
    client = triton.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert {m.name for m in client.get_model_repository_index().models} >= {"tiny", "mlp", "digits", "imgcls"}
    metadata = client.get_model_metadata("tiny")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 16])]

    x = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    request = triton.InferInput("input", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    result = client.infer("tiny", [request], outputs=[triton.InferRequestedOutput("output")])
    session = ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["output"], {"input": x})
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
    client.close()

    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    # the models loaded (digits and imgcls run preprocessing kernels at load): nothing compiled past the baked cache
    cache = "/var/cache/ferry/numba"
    compiled = podman("exec", name, "find", cache, "-type", "f", "-newer", f"{cache}/.warmed").stdout.split()
    assert compiled == [], "the container compiled kernels the build did not bake"


@pytest.mark.timeout(2400)
def test_the_health_check_passes_and_sigterm_exits_zero(container: tuple[str, str, int]) -> None:
    name, _, http_port = container
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as response:
        assert response.status == 200  # the HTTP port, published from the container
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    podman("stop", "--time", "60", name, timeout=120)
    (state,) = json.loads(podman("container", "inspect", name).stdout)
    assert state["State"]["ExitCode"] == 0, podman("logs", name, check=False).stderr[-2000:]


@pytest.mark.timeout(2400)
def test_the_deployments_arguments_serve_in_the_image(image: str, run_flags: list[str], example_repo: Path) -> None:
    """The image with deploy/kubernetes/base's container arguments and model mount serves, and SIGTERM ends it with
    exit code 0 before the pod's grace period would have killed it."""
    pod = one("Deployment", "ferry")["spec"]["template"]["spec"]
    (spec,) = containers(one("Deployment", "ferry"))
    help_text = podman("run", "--rm", *run_flags, image, "--help").stdout
    unknown = sorted(set(flag_values(spec["args"])) - set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text)))
    if unknown:
        pytest.skip(f"the image's ferry serve lacks {unknown} (tests/unit/test_manifests.py fails on them)")
    (mount,) = spec["volumeMounts"]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    name = f"ferry-test-deployment-{os.getpid()}"
    grpc_port = free_port()
    podman(
        "run", "--detach", "--name", name, *run_flags, "--publish", f"127.0.0.1:{grpc_port}:{ports['grpc']}",
        "--volume", f"{example_repo.resolve()}:{mount['mountPath']}:ro", image, *spec["args"],
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", timeout_s=300)
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("tiny")
        client.close()
        grace = str(pod["terminationGracePeriodSeconds"])  # past it, podman (like the kubelet) sends SIGKILL
        podman("stop", "--time", grace, name, timeout=float(grace) + 60)
        (state,) = json.loads(podman("container", "inspect", name).stdout)
        assert state["State"]["ExitCode"] == 0, podman("logs", name, check=False).stderr[-2000:]
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
