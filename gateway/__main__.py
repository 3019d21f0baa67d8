"""`python -m gateway`: the command line (gateway.cli)."""
import sys

from .cli import main

sys.exit(main())
