"""`python -m harness ...` is `topk-bench ...` (works from a clone without installing the package)."""
import sys

from harness.cli import main

sys.exit(main())
