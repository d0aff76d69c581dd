"""The ``kdfast`` command: ``kdfast info``, ``kdfast bench``, ``kdfast demo``, ``kdfast demo llm``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fast knowledge distillation for PyTorch and fastai")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build and the status of every backend")
    sub.add_parser("bench", help="time kdfast's kernels against their peers (kdfast bench --help)", add_help=False)
    sub.add_parser("demo", help="fasterai's distillation tutorial, offline (needs fastai); `kdfast demo llm`: "
                                "a language model with the Hugging Face Trainer (needs transformers)", add_help=False)
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
    if argv[:1] == ["llm"]:
        return _demo_llm(argv[1:])
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


def _demo_llm(argv: list[str]) -> int:
    try:
        import accelerate  # noqa: F401
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"kdfast demo llm needs transformers, accelerate and matplotlib ({e}); install them with "
              f"pip install 'kdfast[hf]' matplotlib")
        return 2
    from .demo_llm import main as demo_llm_main
    return demo_llm_main(argv)


def _bench(argv: list[str]) -> int:
    from .bench.run import main as bench_main
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
