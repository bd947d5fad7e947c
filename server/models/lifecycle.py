"""How a model changes while it serves: what a load publishes, what a poll sees, what an upload loads from.

Pure pieces the repository composes (so each is tested without a server):

- :func:`merge`: a freshly built model against the one serving. A version that failed to build keeps its serving
  build (the failure is recorded beside it); a model whose config failed keeps everything it served. What the new
  model no longer serves is returned, to be drained and closed after the publish.
- :class:`Snapshot` and :func:`snapshot`: what a poll reads of one model directory (size and mtime of its config
  and model files). A directory whose snapshot changed since the previous poll is still being written and waits.
- :func:`parse_override` and :func:`stage_files`: ``RepositoryModelLoad``'s ``config`` and ``file:`` parameters.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from google.protobuf import json_format

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument

if TYPE_CHECKING:
    from ferry.server.models.model import ModelVersion
    from ferry.server.models.repository import Model

PROVENANCE_PREFIX = "ferry."
"""``parameters`` keys Ferry adds to the ModelConfig it answers (``ferry.sha256``, ``ferry.loaded_at``, ...). A
config read back and loaded again as an override carries them: they are dropped, never taken for settings."""


def merge(old: Model | None, new: Model) -> tuple[Model, list[ModelVersion]]:
    """The model to publish, and the versions of ``old`` that stop serving once it is published."""
    if old is None or not old.versions:
        return new, []
    if None in new.errors:  # the model as a whole failed (config, no files): everything that served keeps serving
        kept = dataclasses.replace(old, failed={None: new.errors[None]}, errors=dict(old.errors))
        return kept, []
    published = dataclasses.replace(new, versions=dict(new.versions), errors={}, failed={})
    for version, reason in new.errors.items():
        serving = None if version is None else old.versions.get(version)
        if version is not None and serving is not None:
            published.versions[version] = serving
            published.failed[version] = reason
        else:
            published.errors[version] = reason
    retired = [mv for number, mv in old.versions.items() if published.versions.get(number) is not mv]
    return published, retired


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a poll reads of one model directory: (relative path, size, mtime_ns) of each file that matters."""

    files: tuple[tuple[str, int, int], ...]


def snapshot(path: Path) -> Snapshot:
    """The config files and each ``<version>/`` folder's files of a model directory (missing: empty)."""
    found: list[tuple[str, int, int]] = []
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return Snapshot(())
    for entry in entries:
        try:
            if entry.is_file():
                stat = entry.stat()
                found.append((entry.name, stat.st_size, stat.st_mtime_ns))
            elif entry.is_dir() and entry.name.isdigit():
                for inner in sorted(entry.rglob("*")):
                    if inner.is_file():
                        stat = inner.stat()
                        found.append((str(inner.relative_to(path)), stat.st_size, stat.st_mtime_ns))
        except OSError:  # removed while we read: the next poll sees what is left
            continue
    return Snapshot(tuple(found))


def parse_override(text: str, model_name: str) -> mc.ModelConfig:
    """A ``config`` load parameter: a JSON ModelConfig (Triton's), used instead of ``config.pbtxt``."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as err:
        raise InvalidArgument(f"model {model_name!r}: the config parameter is not a JSON ModelConfig: {err}") from None
    for key in [k for k in config.parameters if k.startswith(PROVENANCE_PREFIX)]:
        del config.parameters[key]
    if not config.name:
        config.name = model_name
    return config


def stage_files(model_name: str, files: Mapping[str, bytes], root: Path) -> Path:
    """Write ``file:<path>`` parameters into a fresh ``<root>/<tmp>/<model_name>/`` folder (Triton's semantics:
    the uploaded files replace the model directory's content for this load) and return that model folder."""
    if not files:
        raise InvalidArgument(f"model {model_name!r}: no files to stage")
    folder = Path(tempfile.mkdtemp(prefix="ferry-upload-", dir=root))
    staged = folder / model_name
    staged.mkdir()
    try:
        _write_files(model_name, files, staged)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return staged


def _write_files(model_name: str, files: Mapping[str, bytes], staged: Path) -> None:
    for name, content in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts or name.endswith("/"):
            raise InvalidArgument(
                f"model {model_name!r}: file parameter {name!r} must be a relative path inside the model"
            )
        target = staged.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)
            os.fsync(f.fileno())


__all__ = ["PROVENANCE_PREFIX", "Snapshot", "merge", "parse_override", "snapshot", "stage_files"]
