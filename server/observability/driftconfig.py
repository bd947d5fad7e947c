"""Drift detection per model from config.pbtxt ``parameters`` (string values), and the monitor of one version.

=========================  =========  ==================================================================
parameter                  default    meaning
=========================  =========  ==================================================================
``drift_psi_threshold``    ``0.2``    alert when a feature's PSI over the window exceeds it (0 = off)
``drift_ks_threshold``     ``0.2``    alert when a feature's binned KS statistic exceeds it (0 = off)
``drift_window_rows``      ``1000``   rows in the rolling window (it slides by a tenth of that)
``drift_input``            the only   the input whose rows are the features (required with several inputs)
                           input
``drift_webhook_url``      none       also POST each alert as JSON to this http(s) URL
``drift_webhook_timeout_s`` ``2``     bound on one webhook POST, in seconds
=========================  =========  ==================================================================

Monitoring is on for a version when its reference file exists (see
:func:`ferry.server.observability.drift.reference_path`); drift parameters without a reference file are a configuration
error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.observability.drift import REFERENCE_FILE, DriftAlert, DriftMonitor, DriftReference, reference_path

PARAMETERS = (
    "drift_psi_threshold",
    "drift_ks_threshold",
    "drift_window_rows",
    "drift_input",
    "drift_webhook_url",
    "drift_webhook_timeout_s",
)
"""The config.pbtxt ``parameters`` keys read by :meth:`DriftSettings.from_parameters`."""


@dataclass(frozen=True, slots=True)
class DriftSettings:
    """How one model's versions are watched for drift (see the module docstring for the parameters)."""

    psi_threshold: float = 0.2
    ks_threshold: float = 0.2
    window_rows: int = 1000
    input_name: str = ""
    """"" until resolved against the config: :meth:`from_parameters` always names the input."""
    webhook_url: str | None = None
    webhook_timeout_s: float = 2.0

    @classmethod
    def from_parameters(cls, config: mc.ModelConfig) -> DriftSettings:
        """Read and validate the settings of a *completed* config (its inputs and dims are known)."""
        params = {k: v.string_value for k, v in config.parameters.items()}
        where = f"model {config.name!r} parameters"
        defaults = cls()

        def number(key: str, default: float, low: float, high: float) -> float:
            raw = params.get(key)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not low <= value <= high:
                raise InvalidArgument(f"{where}: {key} must be a number in [{low:g}, {high:g}], got {raw!r}")
            return value

        rows_raw = params.get("drift_window_rows", str(defaults.window_rows))
        if not rows_raw.isdigit() or not 1 <= int(rows_raw) <= 10_000_000:
            raise InvalidArgument(f"{where}: drift_window_rows must be an integer in 1..10000000, got {rows_raw!r}")
        inputs = [t.name for t in config.input]
        input_name = params.get("drift_input", "")
        if not input_name:
            if len(inputs) != 1:
                raise InvalidArgument(f"{where}: drift_input must name one of the inputs {inputs}")
            input_name = inputs[0]
        elif input_name not in inputs:
            raise InvalidArgument(
                f"{where}: drift_input {input_name!r} is not an input of the model (inputs: {inputs})"
            )
        url = params.get("drift_webhook_url") or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"{where}: drift_webhook_url must be an http:// or https:// URL, got {url!r}")
        return cls(
            psi_threshold=number("drift_psi_threshold", defaults.psi_threshold, 0.0, math.inf),
            ks_threshold=number("drift_ks_threshold", defaults.ks_threshold, 0.0, 1.0),
            window_rows=int(rows_raw),
            input_name=input_name,
            webhook_url=url,
            webhook_timeout_s=number("drift_webhook_timeout_s", defaults.webhook_timeout_s, 0.001, 60.0),
        )


def feature_count(config: mc.ModelConfig, input_name: str) -> int:
    """Features per row of an input: the product of its dims after the batch dimension (for a model without
    batching, after its first dimension). Raises InvalidArgument when that is not a fixed number."""
    tensor = next(t for t in config.input if t.name == input_name)
    where = f"model {config.name!r} drift_input {input_name!r}"
    if tensor.data_type in (mc.TYPE_STRING, mc.TYPE_INVALID):
        raise InvalidArgument(f"{where}: drift needs a numeric input, not {mc.DataType.Name(tensor.data_type)}")
    dims = list(tensor.dims) if config.max_batch_size > 0 else list(tensor.dims)[1:]
    if any(d < 0 for d in dims) or (config.max_batch_size <= 0 and not tensor.dims):
        raise InvalidArgument(
            f"{where}: drift needs a fixed number of features per row, but dims are {list(tensor.dims)}"
        )
    return math.prod(dims)


def load_monitor(
    config: mc.ModelConfig,
    model_dir: Path,
    version: int,
    alerts_for: Callable[[DriftSettings], Callable[[DriftAlert], None] | None] | None = None,
) -> DriftMonitor | None:
    """The drift monitor of one version of a *completed* config, or None when it has no reference file.
    ``alerts_for(settings)`` gives the monitor's ``on_alert`` (e.g. an AlertWebhook when ``settings.webhook_url``
    is set, else None). Blocking (reads the file): call it where the version loads. Raises InvalidArgument on bad
    parameters, a bad reference file, or drift parameters without one."""
    path = reference_path(model_dir, version)
    if path is None:
        if set_keys := sorted(k for k in config.parameters if k in PARAMETERS):
            raise InvalidArgument(
                f"model {config.name!r} version {version}: parameters {set_keys} are set, but there is no "
                f"{REFERENCE_FILE} in {model_dir / str(version)} or {model_dir}"
            )
        return None
    settings = DriftSettings.from_parameters(config)
    try:
        reference = DriftReference.load(path)
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"model {config.name!r} version {version}: bad drift reference: {err}") from None
    features = feature_count(config, settings.input_name)
    if features != reference.features:
        raise InvalidArgument(
            f"model {config.name!r} version {version}: input {settings.input_name!r} has {features} features per "
            f"row, but {path} has statistics of {reference.features}"
        )
    return DriftMonitor(
        reference,
        settings.window_rows,
        settings.psi_threshold,
        settings.ks_threshold,
        alerts_for(settings) if alerts_for is not None else None,
        model=config.name,
        version=version,
        input_name=settings.input_name,
    )


__all__ = ["PARAMETERS", "DriftSettings", "feature_count", "load_monitor"]
