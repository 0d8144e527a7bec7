"""`python -m tests.cli_entry ARGS`: the `rewrite` command with the test-only passes registered."""

import sys

import tests.passes_for_tests  # noqa: F401  (registers test-identity, test-perturb)
from rewriter.cli import main

if __name__ == "__main__":
    sys.exit(main())
