"""The model repository: which models and versions exist, loading them, and finding the one a request names.

Layout (Triton's): ``<repo>/<model>/config.pbtxt`` (optional; completed from the graph) and
``<repo>/<model>/<version>/model.onnx`` (or the config's ``default_model_filename``).

Build, warm, then publish; drain, then close (DESIGN's trust rule 5). A load builds and warms every version on the
bounded load pool (``model_load_threads``), off the event loop; loads of one model wait for each other, loads of
different models run side by side. The result is published by one dict assignment, so a request sees the old model
or the new one, never a half-built one. A version that failed to build keeps its serving build and the failure is
recorded beside it (:func:`ferry.server.models.lifecycle.merge`); versions that stop serving drain (everything
queued or running on them is answered) and then close, in the background.

Control modes (Triton's): ``none`` loads every model at start and refuses load/unload requests, ``explicit`` loads
the ``load_models`` named (``*``: all) and takes load/unload requests, ``poll`` loads every model and applies what
changes on disk every ``repository_poll_secs`` (:meth:`ModelRepository.poll`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import FerryError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ferry.server.config import ServerConfig
from ferry.server.models.lifecycle import Snapshot, merge, parse_override, snapshot, stage_files
from ferry.server.models.model import ModelVersion
from ferry.server.models.modelconfig import parse_config, select_versions
from ferry.server.models.routing import DIRECT, LABEL, LATEST, SPLIT, Routing, parse_routing
from ferry.server.observability.monitoring import Monitoring
from ferry.server.observability.telemetry import NO_TRACING, Tracing

log = logging.getLogger(__name__)

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
CONTROL_REFUSED = "explicit model load / unload is not allowed if polling is enabled"
MAX_UPLOADED_MODELS = 64
"""Models served from uploaded files (``file:`` load parameters) at once. Each holds a session, worker threads and a
staging folder, and a client chooses how many names it uploads: past the bound a load is RESOURCE_EXHAUSTED until
one is unloaded (a reload of a model already uploaded replaces it and is always taken)."""
"""Triton's words (and status, UNAVAILABLE) for a load or unload request outside the explicit mode."""


@dataclass(slots=True)
class Model:
    """A model directory: its serving versions, the versions that never loaded (``errors``, with why), and the
    failed attempts to rebuild a version that still serves its earlier build (``failed``; None = the model as a
    whole, e.g. a broken config: every serving version stays)."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    errors: dict[int | None, str] = field(default_factory=dict)  # None = the model as a whole
    routing: Routing | None = None  # version labels, traffic split, shadow (models/routing.py); None: none declared
    failed: dict[int | None, str] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load published, and what of it failed (empty: everything it asked for serves)."""

    model: Model
    failures: dict[int | None, str]


class ModelRepository:
    def __init__(
        self,
        config: ServerConfig,
        on_close: Callable[[str, int], None] = lambda name, version: None,
        tracing: Tracing = NO_TRACING,
        monitoring: Monitoring | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> None:
        """``on_close(name, version)`` is called for every version that stops serving (the cache forgets it).
        ``visible(name)``, when given, is asked on every lookup by name: a model it denies is answered exactly as
        one that does not exist (the auth guard: a caller's allow-list)."""
        self._config = config
        self._tracing = tracing
        self.monitoring = monitoring or Monitoring()
        self._on_close = on_close
        self._root = config.model_repository
        self._models: dict[str, Model] = {}
        self._visible = visible
        self._pool = ThreadPoolExecutor(config.model_load_threads, thread_name_prefix="ferry-load")
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._uploads: dict[str, Path] = {}  # model -> the staging folder of its uploaded files, while it serves them
        self.max_uploaded_models = MAX_UPLOADED_MODELS
        self._applied: dict[str, Snapshot] = {}  # poll: what each model's directory looked like when last loaded
        self._seen: dict[str, Snapshot] = {}  # poll: what it looked like at the previous poll
        self.loaded = False

    @property
    def control_mode(self) -> str:
        return self._config.model_control_mode

    def model_dirs(self) -> list[Path]:
        return sorted(p for p in self._root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def startup_models(self) -> list[str]:
        """The models loaded at start: all of them, or in the explicit mode those ``load_models`` names."""
        names = [p.name for p in self.model_dirs()]
        if self.control_mode != "explicit" or "*" in self._config.load_models:
            return names
        for name in self._config.load_models:
            if name not in names:
                log.error("--load-model %r: no such model directory in %s", name, self._root)
        return [n for n in names if n in self._config.load_models]

    def load_all(self) -> None:
        """Load the start-up models one after the other in this thread (blocking; before anything is published).
        The server uses :meth:`load_startup`; this serves tools that have no event loop."""
        for name in self.startup_models():
            self._publish(*merge(None, self._build(name, None, None)))
        self.loaded = True

    async def load_startup(self) -> None:
        """Load the start-up models, side by side on the load pool; a model that fails is kept with its error."""
        names = self.startup_models()
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %r failed to load at start: %s", name, result)
        if self.control_mode == "poll":
            for name in names:
                self._applied[name] = self._seen[name] = snapshot(self._root / name)
        self.loaded = True

    async def load(
        self, name: str, config_json: str | None = None, files: Mapping[str, bytes] | None = None
    ) -> LoadResult:
        """(Re)load one model and publish what built; the versions it replaces drain and close in the background.

        ``config_json`` (a JSON ModelConfig) is used instead of ``config.pbtxt``; ``files`` (relative path ->
        bytes) replace the model directory's content for this load, as Triton's ``file:`` parameters do. A caller
        that goes away does not stop the load (a half-finished load would leak what it built): it completes."""
        task = asyncio.ensure_future(self._load(name, config_json, files))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read, should its caller be gone
        return await asyncio.shield(task)

    async def _load(self, name: str, config_json: str | None, files: Mapping[str, bytes] | None) -> LoadResult:
        _check_name(name)
        if not self._sees(name):  # a model the caller may not see is answered as one that does not exist
            raise NotFound(f"model {name!r} has no directory in the repository {str(self._root)!r}")
        if files and config_json is None:
            raise InvalidArgument(
                f"model {name!r}: file parameters need the config parameter too (the uploaded files replace the "
                "model directory, config.pbtxt included)"
            )
        source = self._root / name
        if not files and not source.is_dir():
            raise NotFound(f"model {name!r} has no directory in the repository {str(self._root)!r}")
        override = parse_override(config_json, name) if config_json is not None else None
        if files:
            self._check_upload_room(name)  # before a lock is made for a name the client chose
        async with self._locks.setdefault(name, asyncio.Lock()):
            staged = None
            if files:
                self._check_upload_room(name)  # again: another upload may have taken the room meanwhile
                staging_root = Path(tempfile.gettempdir())
                staged = await asyncio.get_running_loop().run_in_executor(
                    self._pool, stage_files, name, dict(files), staging_root
                )
            try:
                built = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._build, name, override, staged
                )
            except BaseException:
                _remove_staging(staged)
                raise
            published, retired = merge(self._models.get(name), built)
            failures = {**built.errors}
            if built.versions:  # what built serves: an earlier upload's folder goes once its versions drained
                self._forget_upload(name)
                if staged is not None:
                    self._uploads[name] = staged
            else:
                _remove_staging(staged)
            self._publish(published, retired, built)
        return LoadResult(published, failures)

    def _check_upload_room(self, name: str) -> None:
        if name not in self._uploads and len(self._uploads) >= self.max_uploaded_models:
            raise ResourceExhausted(
                f"model {name!r}: {len(self._uploads)} models already serve uploaded files, the most this server "
                f"holds ({self.max_uploaded_models}); unload one first"
            )

    def _build(self, name: str, override: mc.ModelConfig | None, staged: Path | None) -> Model:
        """Blocking, on the load pool: build and warm every version the model's policy serves."""
        return _load_model(
            self._config, staged if staged is not None else self._root / name, self._tracing, self.monitoring, override
        )

    def _publish(self, model: Model, retired: list[ModelVersion], built: Model | None = None) -> None:
        """Make ``model`` the one requests find; ``built``: what this load built (its versions are logged)."""
        self._models[model.name] = model
        for mv in (built or model).versions.values():
            log.info(
                "loaded %s from %s (sha256 %s, %.2fs, warmup %d runs in %.3fs)",
                mv.describe(),
                mv.path,
                mv.sha256[:12],
                mv.load_seconds,
                mv.warmup_runs,
                mv.warmup_seconds,
            )
        for failed, reason in model.errors.items():
            log.error("model %r version %s failed to load: %s", model.name, "-" if failed is None else failed, reason)
        for failed, reason in model.failed.items():
            serving = ", ".join(f"{v} (sha256 {mv.sha256[:12]})" for v, mv in sorted(model.versions.items()))
            what = "its config" if failed is None else f"version {failed}"
            log.error("model %r: reload of %s failed, still serving %s: %s", model.name, what, serving, reason)
        for mv in retired:
            self._retire(mv)

    def _retire(self, version: ModelVersion) -> None:
        """Drain and close a version that stopped serving, in the background (close() waits for it)."""

        # The cache forgets the version now (its number may serve again from a new build: entries must not outlive
        # the swap) and again once it closed (what its last in-flight requests stored meanwhile).
        self._on_close(version.name, version.version)

        async def retire() -> None:
            try:
                await version.retire()
            finally:
                self._on_close(version.name, version.version)
                log.info("%s drained and closed", version.describe())

        task = asyncio.get_running_loop().create_task(retire(), name=f"retire {version.describe()}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def drained(self) -> None:
        """Wait until every version that stopped serving has drained and closed."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def unload(self, name: str) -> None:
        """Stop serving a model: new requests get NOT_FOUND at once; everything queued or running on it is answered,
        then it closes (this returns after that)."""
        _check_name(name)
        if name not in self._models or not self._sees(name):
            raise NotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self._models.pop(name, None)
            if model is None:
                raise NotFound(f"model {name!r} is not loaded")
            for version in model.versions.values():
                self._retire(version)
            self._forget_upload(name)
        await self.drained()

    def _forget_upload(self, name: str) -> None:
        staged = self._uploads.pop(name, None)
        if staged is not None:
            self._remove_later(staged)

    def _remove_later(self, staged: Path) -> None:
        """Remove an upload's folder once the versions loaded from it have drained (their files are open until)."""
        pending = set(self._retiring)

        async def remove() -> None:
            await asyncio.gather(*pending, return_exceptions=True)
            _remove_staging(staged)

        with contextlib.suppress(RuntimeError):  # no running loop (load_all): remove now
            task = asyncio.get_running_loop().create_task(remove())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return
        _remove_staging(staged)

    async def poll(self) -> None:
        """One poll of the repository (the poll mode): load new models, reload changed ones, unload removed ones.
        A model directory whose files changed since the previous poll is still being written: it waits for a poll
        that finds it as the one before did."""
        present = {p.name: snapshot(p) for p in await asyncio.to_thread(self.model_dirs)}
        changes: list[asyncio.Future[object]] = []
        for name, now in present.items():
            settled = self._seen.get(name) == now
            self._seen[name] = now
            if not settled or self._applied.get(name) == now:
                continue
            self._applied[name] = now
            log.info("poll: model %r changed on disk: reloading", name)
            changes.append(asyncio.ensure_future(self.load(name)))
        for name in [n for n in self._models if n not in present]:
            self._seen.pop(name, None)
            self._applied.pop(name, None)
            log.info("poll: model %r was removed from the repository: unloading", name)
            changes.append(asyncio.ensure_future(self.unload(name)))
        for result in await asyncio.gather(*changes, return_exceptions=True):
            if isinstance(result, BaseException):
                log.error("poll: %s", result)

    async def close(self) -> None:
        """Server shutdown: queued requests fail with UNAVAILABLE, running batches finish."""
        for name in list(self._models):
            model = self._models.pop(name)
            await asyncio.gather(*(v.close() for v in model.versions.values()))
            for version in model.versions.values():
                self._on_close(version.name, version.version)
        await self.drained()
        for name in list(self._uploads):
            _remove_staging(self._uploads.pop(name))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def models(self) -> list[Model]:
        return [self._models[name] for name in sorted(self._models)]

    def _sees(self, name: str) -> bool:
        return self._visible is None or self._visible(name)

    def get_model(self, name: str) -> Model:
        model = self._models.get(name) if self._sees(name) else None
        if model is None:
            raise self._unknown(name)
        return model

    def _unknown(self, name: str) -> FerryError:
        """While the initial load runs, a model not published yet may be one still loading: retryable."""
        if not self.loaded:
            return Unavailable(f"model {name!r} is loading")
        return NotFound(f"unknown model {name!r}")

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version a request names (a number or one of the model's version labels), or the highest loaded
        version when it names none."""
        model = self._models.get(name) if self._sees(name) else None
        if model is None:
            raise self._unknown(name)
        if not version:
            latest = model.latest
            if latest is None:
                raise Unavailable(f"model {name!r} is not ready: {_why(model)}")
            return latest
        if not version.isdigit():
            # -- routing: a version label names its version (labels only name loaded versions: see _load_model)
            labelled = model.routing.label(version) if model.routing is not None else None
            if labelled is None and None in model.errors:  # its config failed: perhaps for this very label
                raise Unavailable(f"model {name!r} is not ready: {_why(model)}")
            if labelled is None:
                labels = f" or one of its labels {sorted(model.routing.labels)}" if model.routing else ""
                what = f"version must be a non-negative integer{labels}"
                raise InvalidArgument(f"model {name!r}: {what}, got {version!r}")
            version = str(labelled)
        found = model.versions.get(int(version))
        if found is not None:
            return found
        if int(version) in model.errors:
            raise Unavailable(f"model {name!r} version {version} is not ready: {model.errors[int(version)]}")
        raise NotFound(f"model {name!r} has no version {version} (serving {sorted(model.versions)})")

    def route(self, name: str, version: str, request_id: str) -> tuple[ModelVersion, str, ModelVersion | None]:
        """For an inference: the version that answers it, the route that chose that version (models.routing.ROUTES)
        and, when the request is sampled for the model's shadow, the version that shadows it (else None)."""
        model = self._models.get(name)
        routing = model.routing if model is not None else None
        if routing is None:
            return self.resolve(name, version), DIRECT if version else LATEST, None
        if version:
            chosen, route = self.resolve(name, version), DIRECT if version.isdigit() else LABEL
        elif routing.split:
            chosen, route = self.resolve(name, str(routing.pick(name, request_id))), SPLIT
        else:
            chosen, route = self.resolve(name), LATEST
        shadow = None
        if routing.shadow is not None and routing.shadow.version != chosen.version and routing.sample_shadow():
            assert model is not None
            shadow = model.versions.get(routing.shadow.version)
        return chosen, route, shadow

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except FerryError:
            return False
        return True

    def index(self) -> Iterator[IndexEntry]:
        """Every model and version the repository knows, loaded or failed, by name then version. A serving
        version's reason carries its provenance (file sha256, load time) and, after a failed reload, the failure."""
        names = sorted({p.name for p in self.model_dirs()} | set(self._models))
        for name in names:
            model = self._models.get(name)
            if model is None:
                yield IndexEntry(name, "", UNAVAILABLE, "not loaded")
                continue
            entries: list[tuple[int | None, str, str]] = [
                (v, READY, _serving_reason(mv, model)) for v, mv in model.versions.items()
            ]
            entries += [(v, UNAVAILABLE, reason) for v, reason in model.errors.items()]
            for version, state, reason in sorted(entries, key=lambda e: -1 if e[0] is None else e[0]):
                yield IndexEntry(model.name, "" if version is None else str(version), state, reason)


def provenance(mv: ModelVersion) -> str:
    """``sha256=<hex> loaded_at=<UTC ISO time>``: which artifact a version serves, and since when."""
    return f"sha256={mv.sha256} loaded_at={iso_time(mv.loaded_at)}"


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _serving_reason(mv: ModelVersion, model: Model) -> str:
    failure = model.failed.get(mv.version) or model.failed.get(None)
    return provenance(mv) + (f"; last load failed, this build keeps serving: {failure}" if failure else "")


def _check_name(name: str) -> None:
    """A model name is one directory name: never a path that leaves the repository (or the staging folder)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        raise InvalidArgument(
            f"model name {name!r} must be a directory name (no '/', not empty, not starting with '.')"
        )


def _remove_staging(staged: Path | None) -> None:
    if staged is not None:
        shutil.rmtree(staged.parent, ignore_errors=True)


def _why(model: Model) -> str:
    return "; ".join(f"{'model' if v is None else f'version {v}'}: {r}" for v, r in model.errors.items()) or (
        "no version loaded"
    )


def _load_model(
    server: ServerConfig,
    path: Path,
    tracing: Tracing,
    monitoring: Monitoring,
    override: mc.ModelConfig | None = None,
) -> Model:
    model = Model(path.name)
    try:
        config_path = path / "config.pbtxt"
        if override is not None:
            config = override
        elif config_path.exists():
            config = parse_config(config_path.read_text(), str(config_path))
        else:
            config = mc.ModelConfig()
        routing = parse_routing(config, path.name)  # malformed labels, split or shadow: nothing loads
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
        except Exception as err:  # onnxruntime and numpy raise their own types: the version failed, not the server
            model.errors[version] = f"{type(err).__name__}: {err}"
    if routing is not None:  # -- routing: it may only name loaded versions, else the model's config fails
        try:
            routing.check(path.name, model.versions)
        except FerryError as err:
            model.errors[None] = str(err)
            for loaded in model.versions.values():
                loaded.discard()
            model.versions.clear()
        else:
            model.routing = routing
    return model
