"""`python -m robustcl` is the `robustcl` command."""
import sys

from robustcl.cli import main

sys.exit(main())
