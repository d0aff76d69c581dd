"""Benchmark results (bench/results/) and the GPU check (gpu_check.sh). The benchmarks are
part of the package: ``kdfast bench`` (kdfast/bench/)."""
