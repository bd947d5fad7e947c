"""The rooms of ``ferry.server`` import one way (docs/architecture.md): transport → api → inference → models →
kernels, with ``observability``, ``config`` and ``security`` leaves any room may call. A module may import its own
room, a room below it, or a leaf; a leaf imports only leaves. Imports under ``if TYPE_CHECKING:`` count too: a type
names the room it comes from. The composition root (``app``, ``__main__``) may import anything. The client SDK
imports no server code (but its offline generator, which completes a model's config with the server's own
reader)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("transport", "api", "inference", "models", "security")  # each may import the rooms after it
LEAVES = ("observability", "config")
TOP = ("app", "__main__", "__init__", "workers")  # composition: servers (workers) of rooms (app)

KNOWN = {
    ("inference.call", "api.codec"): "inference still decodes and encodes protobuf itself; to move into api (REST)",
    ("observability.metrics", "inference.cache"): "the collector reads the cache's statistics at scrape time",
    ("observability.metrics", "models.repository"): "the collector reads each loaded version at scrape time",
    ("observability.outcomes", "api.rpc"): "the outcome tracker serves its own gRPC service (ferry.v1)",
}
"""Imports against the direction, each with its reason: the next change to each module removes its entry."""


def room_of(module: str) -> str:
    """``ferry.server.models.model`` → ``models``; ``ferry.server.config`` → ``config``; ``ferry.server`` →
    ``__init__``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def server_modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "server").rglob("*.py")):
        parts = path.relative_to(ROOT / "server").with_suffix("").parts
        out[".".join(["ferry", "server", *(p for p in parts if p != "__init__")])] = path
    return out


def imports_of(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against ``package``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def allowed(importer: str, imported: str) -> bool:
    here, there = room_of(importer), room_of(imported)
    if here in TOP or here == there or there in LEAVES or there == "__init__":  # ferry.server holds __version__
        return True
    if here in LEAVES or there in TOP:
        return False
    return ORDER.index(there) > ORDER.index(here)


def test_rooms_import_one_way() -> None:
    modules = server_modules()
    wrong = []
    used = set()
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for imported in imports_of(path, package):
            if imported not in modules or allowed(module, imported):
                continue
            key = (module.removeprefix("ferry.server."), imported.removeprefix("ferry.server."))
            if key in KNOWN:
                used.add(key)
            else:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports against the rooms' direction:\n" + "\n".join(sorted(wrong))
    assert used == set(KNOWN), f"KNOWN lists imports that are gone: {set(KNOWN) - used}"


def test_every_server_module_lives_in_a_room() -> None:
    rooms = set(ORDER) | set(LEAVES) | set(TOP)
    assert {room_of(m) for m in server_modules()} <= rooms


def test_the_client_sdk_imports_no_server_code() -> None:
    for path in sorted((ROOT / "client").rglob("*.py")):
        if "_proto" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        offline = {  # the generator's offline path imports the server's config reader inside one function
            node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and path.name == "codegen.py"
        }
        inside = {id(n) for f in offline for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import) and id(node) not in inside:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith(("ferry.server", "ferry.loadtest")) for n in names), f"{path}: {names}"


def test_a_wrong_import_is_caught() -> None:
    """The rule itself: an upward import and a leaf reaching into a room are refused; a downward one is not."""
    assert not allowed("ferry.server.models.model", "ferry.server.api.servicer")
    assert not allowed("ferry.server.observability.stats", "ferry.server.models.model")
    assert not allowed("ferry.server.transport.connection", "ferry.server.app")
    assert allowed("ferry.server.api.servicer", "ferry.server.inference.call")
    assert allowed("ferry.server.models.model", "ferry.server.observability.stats")
    assert allowed("ferry.server.security.guard", "ferry.server.observability.predlog")
    assert not allowed("ferry.server.security.guard", "ferry.server.models.repository")
