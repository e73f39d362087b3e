"""The `fusedrl` command (setup.py's entry point `fusedrl.engine.cli:main`; `python -m
fusedrl.engine.cli` runs it too): commands.py parses and dispatches every subcommand, generate.py is
`fusedrl generate`'s parser and run. Importing it imports no torch."""
from .commands import STAGES, build_parser, dashed_as_overrides, main

__all__ = ["STAGES", "build_parser", "dashed_as_overrides", "main"]
