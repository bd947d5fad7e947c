"""What Ferry tells about itself, called at stage boundaries by every room: Prometheus metrics (``metrics``) from
per-version statistics (``stats``), traces (``telemetry``, their OTLP encoding ``otlp``, Triton's trace settings
``tracesettings``), the prediction log (``predlog``), outcomes and live accuracy (``outcomes``), drift (``drift``,
``driftconfig``), the per-version monitor that holds them (``monitoring``), alert webhooks (``webhook``) and the
event-loop watchdog (``loopwatch``). A leaf: it imports no other room (``metrics`` reads the repository and cache it
reports on, and ``outcomes`` serves its own gRPC service: the exceptions the import test names)."""
