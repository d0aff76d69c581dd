"""``python -m bench`` in a checkout: the same as ``kdfast bench`` (kdfast/bench/)."""
import sys

from kdfast.bench.run import main

sys.exit(main())
