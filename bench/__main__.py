"""`python -m bench`: run the CPU benchmark suite (see bench/suite.py)."""
import sys

from bench.suite import main

sys.exit(main())
