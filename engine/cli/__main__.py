"""`python -m fusedrl.engine.cli ARGS`: the `fusedrl` command."""
import sys

from .commands import main

sys.exit(main())
