"""The model repository: which models and versions exist, loading them, and finding the one a request names.

Layout (Triton's): ``<repo>/<model>/config.pbtxt`` (optional; completed from the graph) and
``<repo>/<model>/<version>/model.onnx`` (or the config's ``default_model_filename``). Loading is blocking and runs
off the event loop; a model is published by one dict assignment once every version finished, so readers never see
a half-loaded model. A model or version that fails to load is kept with its error and the others still serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import FerryError, InvalidArgument, NotFound, Unavailable
from ferry.server.config import ServerConfig
from ferry.server.models.model import ModelVersion
from ferry.server.models.modelconfig import parse_config, select_versions
from ferry.server.observability.monitoring import Monitoring
from ferry.server.observability.telemetry import NO_TRACING, Tracing

log = logging.getLogger(__name__)

READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass(slots=True)
class Model:
    """A model directory: its loaded versions and, for what failed, why."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    errors: dict[int | None, str] = field(default_factory=dict)  # None = the model as a whole

    @property
    def latest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    @property
    def ready(self) -> bool:
        return bool(self.versions)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelRepository:
    def __init__(
        self,
        config: ServerConfig,
        on_close: Callable[[str, int], None] = lambda name, version: None,
        tracing: Tracing = NO_TRACING,
        monitoring: Monitoring | None = None,
    ) -> None:
        """``on_close(name, version)`` is called for every version that stops serving (the cache forgets it)."""
        self._config = config
        self._tracing = tracing
        self.monitoring = monitoring or Monitoring()
        self._on_close = on_close
        self._root = config.model_repository
        self._models: dict[str, Model] = {}
        self.loaded = False

    def model_dirs(self) -> list[Path]:
        return sorted(p for p in self._root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def load_all(self) -> None:
        """Load every model in the repository (blocking; at start, before any model is published)."""
        for path in self.model_dirs():
            self._publish(_load_model(self._config, path, self._tracing, self.monitoring))
        self.loaded = True

    async def load(self, name: str) -> Model:
        """(Re)load one model from disk and publish it; the versions it replaces drain and close."""
        path = self._root / name
        # a plain directory name only: "", ".", "..", "a/../b" or an absolute path would load from elsewhere
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name or not path.is_dir():
            raise NotFound(f"model {name!r} has no directory in the repository {str(self._root)!r}")
        model = await asyncio.to_thread(_load_model, self._config, path, self._tracing, self.monitoring)
        old = self._publish(model)
        if old is not None:
            await self._close(old)
        return model

    def _publish(self, model: Model) -> Model | None:
        old = self._models.get(model.name)
        self._models[model.name] = model
        for failed, reason in model.errors.items():
            log.error("model %r version %s failed to load: %s", model.name, "-" if failed is None else failed, reason)
        for mv in model.versions.values():
            log.info("loaded %s from %s (sha256 %s, %.2fs)", mv.describe(), mv.path, mv.sha256[:12], mv.load_seconds)
        return old

    async def unload(self, name: str) -> None:
        """Stop serving a model: new requests get NOT_FOUND, queued ones UNAVAILABLE, running batches finish."""
        model = self._models.pop(name, None)
        if model is None:
            raise NotFound(f"model {name!r} is not loaded")
        await self._close(model)

    async def _close(self, model: Model) -> None:
        await asyncio.gather(*(version.close() for version in model.versions.values()))
        for version in model.versions.values():
            self._on_close(version.name, version.version)

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)

    def models(self) -> list[Model]:
        return [self._models[name] for name in sorted(self._models)]

    def get_model(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}")
        return model

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version a request names, or the highest loaded version when it names none."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}")
        if not version:
            latest = model.latest
            if latest is None:
                raise Unavailable(f"model {name!r} is not ready: {_why(model)}")
            return latest
        if not version.isdigit():
            raise InvalidArgument(f"model {name!r}: version must be a non-negative integer, got {version!r}")
        found = model.versions.get(int(version))
        if found is not None:
            return found
        if int(version) in model.errors:
            raise Unavailable(f"model {name!r} version {version} is not ready: {model.errors[int(version)]}")
        raise NotFound(f"model {name!r} has no version {version} (serving {sorted(model.versions)})")

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except FerryError:
            return False
        return True

    def index(self) -> Iterator[IndexEntry]:
        """Every model and version the repository knows, loaded or failed, by name then version."""
        for path in self.model_dirs():
            model = self._models.get(path.name)
            if model is None:
                yield IndexEntry(path.name, "", UNAVAILABLE, "not loaded")
                continue
            entries = [(v, READY, "") for v in model.versions] + [
                (v, UNAVAILABLE, reason) for v, reason in model.errors.items()
            ]
            for version, state, reason in sorted(entries, key=lambda e: -1 if e[0] is None else e[0]):
                yield IndexEntry(model.name, "" if version is None else str(version), state, reason)


def _why(model: Model) -> str:
    return "; ".join(f"{'model' if v is None else f'version {v}'}: {r}" for v, r in model.errors.items()) or (
        "no version loaded"
    )


def _load_model(server: ServerConfig, path: Path, tracing: Tracing, monitoring: Monitoring) -> Model:
    model = Model(path.name)
    try:
        config_path = path / "config.pbtxt"
        config = parse_config(config_path.read_text(), str(config_path)) if config_path.exists() else mc.ModelConfig()
        filename = config.default_model_filename or "model.onnx"
        available = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / filename).is_file()]
        if not available:
            raise NotFound(f"no <version>/{filename} under {path}")
        chosen, missing = select_versions(config, available)
    except (FerryError, OSError) as err:
        model.errors[None] = str(err)
        return model
    for version, reason in missing.items():
        model.errors[version] = reason
    for version in chosen:
        try:
            model.versions[version] = ModelVersion.load(
                server, config, path.name, version, path / str(version) / filename, tracing, monitoring
            )
        except (FerryError, OSError) as err:
            model.errors[version] = str(err)
    return model
