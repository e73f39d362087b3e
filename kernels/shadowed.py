"""What kernels/ does when it is imported as the top-level `kernels` rather than `fusedrl.kernels`.

That happens when the repository root is on sys.path (Python run from the root: `python -c`,
`python -m pytest`), and transformers itself imports `kernels` whenever some `kernels` is found,
to see whether Hugging Face's hub-kernels package is installed. This folder must then neither
register the fusedrl:: ops a second time nor break transformers: it hands the name over to another
installed `kernels` (Hugging Face's) if there is one, and otherwise stays an empty module without
`__file__`, which transformers takes for "not installed". Nothing here imports torch.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def stand_aside(name: str, init_file: str) -> None:
    """Replace module `name` (this folder, imported under a foreign name) in sys.modules by the next
    `name` on sys.path outside the repository, or leave it empty and file-less."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        sys.modules[name].__file__ = None
        return
    other = importlib.util.module_from_spec(spec)
    sys.modules[name] = other  # the import statement returns what sys.modules holds after this
    spec.loader.exec_module(other)
