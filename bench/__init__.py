"""kdfast's benchmarks: one module per op family on the shared harness (bench/harness.py).
Run them with ``kdfast bench`` (or ``python -m bench``); they are not tests."""
