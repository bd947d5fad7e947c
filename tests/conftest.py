"""Shared fixtures: the example model repository, built once per session (or reused when already built)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_models import build_repository  # noqa: E402


@pytest.fixture(scope="session")
def example_repo() -> Path:
    """The example repository (mlp, tiny, digits v1+v2), built by examples/make_models.py if missing."""
    path = Path(os.environ.get("FERRY_EXAMPLE_MODELS", ROOT / "examples" / "models"))
    build_repository(path)
    return path


def build_test_repository(root: Path) -> Path:
    """A repository exercising the server: every datatype, batching and fixed models, a version policy, and
    models that fail to load (a corrupt file, a config.pbtxt syntax error)."""
    from tests import models

    models.write_identity_all_types(root / "identity" / "1" / "model.onnx")  # no config.pbtxt: completed
    models.write_add(root / "add" / "1" / "model.onnx")
    (root / "add" / "config.pbtxt").write_text(
        'name: "add"\nmax_batch_size: 8\n'
        'input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] },\n'
        '         { name: "diff" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    models.write_fixed_shape(root / "fixed" / "1" / "model.onnx")
    for version in (1, 2, 3):
        models.write_scale(root / "scale" / str(version) / "model.onnx", float(version))
    (root / "scale" / "config.pbtxt").write_text("version_policy: { latest { num_versions: 2 } }\n")
    models.write_corrupt(root / "broken" / "1" / "model.onnx")
    models.write_scale(root / "badconfig" / "1" / "model.onnx", 1.0)
    (root / "badconfig" / "config.pbtxt").write_text("max_batch_size: [oops\n")
    return root


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("repo"))
