"""The TRL integrations under a TRL older than they are written for: one line naming the module, the
trl found and the one needed, not an ImportError of a name TRL 1.x added."""
from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize("module", ["fusedrl.kernels.integrations.trl",
                                    "fusedrl.kernels.integrations.trl_distill"])
def test_an_older_trl_is_named_in_one_line(module, monkeypatch):
    trl = pytest.importorskip("trl")
    monkeypatch.setattr(trl, "__version__", "0.29.1")
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError) as refused:
        importlib.import_module(module)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith(f"{module} needs trl >= 1.16 (pip install 'fusedrl[trl]'), found trl "
                           "0.29.1")
