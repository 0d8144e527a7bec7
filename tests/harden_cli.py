"""`python -m tests.harden_cli ARGS`: the `rewrite` command with the hardening test passes."""

import sys

import tests.test_nonfinite  # noqa: F401  (registers test-nan-*)
from rewriter.cli import main

if __name__ == "__main__":
    sys.exit(main())
