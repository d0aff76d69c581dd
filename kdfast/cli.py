"""The ``kdfast`` command: ``kdfast info``, ``kdfast bench``, ``kdfast demo``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fast knowledge distillation for PyTorch and fastai")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build and the status of every backend")
    sub.add_parser("bench", help="run kdfast's benchmarks (from a source checkout)", add_help=False)
    sub.add_parser("demo", help="fasterai's distillation tutorial, offline (needs fastai)", add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command == "info":
        from .info import info
        info()
        return 0
    if args.command == "bench":
        return _bench(rest)
    if args.command == "demo":
        return _demo(rest)
    return 1


def _demo(argv: list[str]) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")  # fastai's import
    try:
        import fastai  # noqa: F401
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"kdfast demo needs fastai, scikit-learn and matplotlib ({e}); install them with "
              f"pip install 'kdfast[fastai]' (or `make demo` in a source checkout)")
        return 2
    from .demo import main as demo_main
    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    """Benchmarks live in the checkout's bench/ folder, next to the kdfast package."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", "run.py")):
        print("kdfast bench: the benchmarks live in the bench/ folder of a kdfast source checkout; "
              "install kdfast from one (pip install -e . --no-build-isolation) to run them")
        return 2
    sys.path.insert(0, root)
    from bench.run import main as bench_main
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
