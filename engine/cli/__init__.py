"""The `fusedrl` command (setup.py's entry point `fusedrl.engine.cli:main`; `python -m
fusedrl.engine.cli` runs it too): commands.py parses and dispatches every subcommand (info and demo
its own), stages.py the training stages' and plan's, run_outputs.py plot's and export's, generate.py
`fusedrl generate`'s parser and run, flags.py the flags they share. Importing it imports no
torch."""
from .commands import STAGES, build_parser, dashed_as_overrides, main

__all__ = ["STAGES", "build_parser", "dashed_as_overrides", "main"]
