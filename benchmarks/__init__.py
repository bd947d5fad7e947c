"""The project's own benchmarks, baselines and peer comparisons (``make bench``; not installed): run from the
repository root as ``python -m benchmarks.NAME``."""
