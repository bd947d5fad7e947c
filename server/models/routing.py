"""Version labels, the weighted traffic split and the shadow of one model, as its config.pbtxt ``parameters`` say:

    parameters { key: "version_labels" value: { string_value: "stable=3,canary=4" } }
    parameters { key: "traffic_split" value: { string_value: "3=90,4=10" } }
    parameters { key: "shadow" value: { string_value: "version=5,fraction=0.2" } }

- A label names a version wherever a request names one (``model_version: "canary"``). Labels look like identifiers
  (never all digits, so they cannot be mistaken for a version number); several may name one version.
- The split sends requests that name no version to the versions it weighs (integer weights, relative: ``3=9,4=1``
  is ``3=90,4=10``): the same request ``id`` always lands on the same version (a keyed hash of model name and id),
  requests without an id are drawn at random.
- The shadow runs a sampled ``fraction`` of the model's requests again on its ``version`` after they were answered,
  at most ``max_in_flight`` at once (default 16), to compare the two; split and shadow keys may name a label.

:func:`parse_routing` reads the parameters strictly (every malformed entry is an error naming it) before any version
loads; :meth:`Routing.check` then refuses a routing that names a version which did not load. A :class:`Routing` is
immutable and published with its model in one assignment, so moving a label or a weight is atomic.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument

PARAMETERS = ("version_labels", "traffic_split", "shadow")
"""The config.pbtxt ``parameters`` keys read here."""

DIRECT, LATEST, LABEL, SPLIT, SHADOW = "direct", "latest", "label", "split", "shadow"
ROUTES = (DIRECT, LATEST, LABEL, SPLIT, SHADOW)
"""How a request reached its version: it named the number, named nothing (the highest version), named a label, was
sent by the split; ``shadow`` counts the shadow runs a version made."""

DEFAULT_SHADOW_MAX_IN_FLIGHT = 16
MAX_SHADOW_IN_FLIGHT = 1024
MAX_WEIGHT = 1_000_000
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,62}")  # never all digits: those are version numbers
_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True, slots=True)
class Shadow:
    version: int
    fraction: float
    """The share of the model's requests also run on ``version``, in (0, 1]."""
    max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT
    """Shadow runs of this model at once; past it a sampled request's shadow run is dropped (and counted)."""


@dataclass(frozen=True, slots=True)
class Routing:
    labels: Mapping[str, int]
    split: tuple[tuple[int, int], ...]
    """(version, weight) pairs with weight > 0, in the order declared."""
    shadow: Shadow | None
    named: tuple[tuple[int, str], ...]
    """Every version the parameters name, with the entry that names it (for error messages)."""

    def label(self, name: str) -> int | None:
        return self.labels.get(name)

    def pick(self, model: str, request_id: str) -> int:
        """The split's version for one request: by a keyed hash of ``request_id`` when there is one, else drawn."""
        total = sum(weight for _, weight in self.split)
        if request_id:
            digest = hashlib.blake2b(f"{model}\0{request_id}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") % total
        else:
            point = _random.randrange(total)
        for version, weight in self.split:
            if point < weight:
                return version
            point -= weight
        raise AssertionError("unreachable: the point is below the total weight")

    def sample_shadow(self) -> bool:
        shadow = self.shadow
        return shadow is not None and (shadow.fraction >= 1.0 or _random.random() < shadow.fraction)

    def check(self, model: str, loaded: Collection[int]) -> None:
        """Raise InvalidArgument naming the first version the parameters name that is not among ``loaded``."""
        for version, entry in self.named:
            if version not in loaded:
                raise InvalidArgument(
                    f"model {model!r} parameters: {entry} names version {version}, which is not loaded "
                    f"(loaded: {sorted(loaded)}; a label, split or shadow may only name a loaded version)"
                )


_random = random.Random()


def parse_routing(config: mc.ModelConfig, model: str) -> Routing | None:
    """The model's routing, or None when its config declares none. Raises InvalidArgument on any malformed entry."""
    params = {key: config.parameters[key].string_value for key in PARAMETERS if key in config.parameters}
    if not params:
        return None
    where = f"model {model!r} parameters"
    named: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    for key, value in _pairs(params.get("version_labels", ""), f"{where}: version_labels"):
        what = f"{where}: version_labels entry {key}={value}"
        if not _LABEL.fullmatch(key):
            raise InvalidArgument(
                f"{what}: a label is a letter or '_' then up to 62 letters, digits, '_', '.' or '-', got {key!r}"
            )
        if key in labels:
            raise InvalidArgument(f"{where}: version_labels names label {key!r} twice")
        labels[key] = _version(value, what)
        named.append((labels[key], f"version_labels ({key}={value})"))

    def version_of(raw: str, what: str) -> int:
        return labels[raw] if raw in labels else _version(raw, what)

    split: list[tuple[int, int]] = []
    seen: set[int] = set()
    for key, value in _pairs(params.get("traffic_split", ""), f"{where}: traffic_split"):
        what = f"{where}: traffic_split entry {key}={value}"
        version = version_of(key, what)
        if version in seen:
            raise InvalidArgument(f"{where}: traffic_split names version {version} twice")
        seen.add(version)
        if not _DIGITS.fullmatch(value) or int(value) > MAX_WEIGHT:
            raise InvalidArgument(f"{what}: a weight is an integer in 0..{MAX_WEIGHT}, got {value!r}")
        named.append((version, f"traffic_split ({key}={value})"))
        if int(value):
            split.append((version, int(value)))
    if "traffic_split" in params and not split:
        raise InvalidArgument(f"{where}: traffic_split must give some version a weight above 0")

    shadow = None
    if "shadow" in params:
        shadow = _shadow(dict(_pairs(params["shadow"], f"{where}: shadow")), params["shadow"], where, version_of)
        named.append((shadow.version, f"shadow ({params['shadow']})"))
    return Routing(labels, tuple(split), shadow, tuple(named))


def _shadow(entries: dict[str, str], raw: str, where: str, version_of: Callable[[str, str], int]) -> Shadow:
    what = f"{where}: shadow {raw!r}"
    unknown = sorted(set(entries) - {"version", "fraction", "max_in_flight"})
    if unknown:
        raise InvalidArgument(f"{what}: unknown keys {unknown} (known: version, fraction, max_in_flight)")
    missing = [key for key in ("version", "fraction") if key not in entries]
    if missing:
        raise InvalidArgument(f"{what}: missing {' and '.join(missing)}")
    try:
        fraction = float(entries["fraction"])
    except ValueError:
        fraction = math.nan
    if not 0.0 < fraction <= 1.0:  # also refuses nan
        raise InvalidArgument(f"{what}: fraction must be a number in (0, 1], got {entries['fraction']!r}")
    max_in_flight = DEFAULT_SHADOW_MAX_IN_FLIGHT
    if "max_in_flight" in entries:
        raw_max = entries["max_in_flight"]
        if not _DIGITS.fullmatch(raw_max) or not 1 <= int(raw_max) <= MAX_SHADOW_IN_FLIGHT:
            raise InvalidArgument(f"{what}: max_in_flight must be an integer in 1..{MAX_SHADOW_IN_FLIGHT}")
        max_in_flight = int(raw_max)
    return Shadow(version_of(entries["version"], what), fraction, max_in_flight)


def _pairs(raw: str, what: str) -> list[tuple[str, str]]:
    """``a=1,b=2`` as [("a", "1"), ("b", "2")], spaces around items allowed; a malformed or repeated key fails."""
    if not raw.strip():
        return []
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise InvalidArgument(f"{what}: expected key=value items separated by commas, got {item.strip()!r}")
        if any(key == k for k, _ in pairs):
            raise InvalidArgument(f"{what}: {key!r} appears twice")
        pairs.append((key, value))
    return pairs


def _version(raw: str, what: str) -> int:
    if not _DIGITS.fullmatch(raw) or int(raw) < 1:
        raise InvalidArgument(f"{what}: a version is a positive integer (or a declared label), got {raw!r}")
    return int(raw)


__all__ = [
    "DIRECT",
    "LABEL",
    "LATEST",
    "PARAMETERS",
    "ROUTES",
    "SHADOW",
    "SPLIT",
    "Routing",
    "Shadow",
    "parse_routing",
]
