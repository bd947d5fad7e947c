"""Load generation, perf_analyzer driving, benchmarks and capacity reports for Ferry."""
