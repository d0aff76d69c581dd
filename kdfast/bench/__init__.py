"""kdfast's benchmarks: one module per op family on the shared harness (harness.py), timed
against the peers' eager formulas (peers.py). Run them with ``kdfast bench`` (or
``python -m kdfast.bench``); they are not tests."""
