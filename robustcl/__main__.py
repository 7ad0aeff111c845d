"""`python -m robustcl` is the `robustcl` command."""
import sys

from robustcl.cli import entry

sys.exit(entry())
