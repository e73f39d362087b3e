"""The import names: fusedrl.kernels / fusedrl.engine, no second copy from the repository root,
and the kernels package without triton. Each case runs in a fresh interpreter."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, cwd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_kernels_import_and_run_without_triton(tmp_path):
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, NoTriton())
import torch
import fusedrl.kernels as k
from fusedrl.kernels.triton_compat import TRITON_AVAILABLE
assert not TRITON_AVAILABLE and "triton" not in sys.modules
assert k.backend_for(torch.zeros(1)) == "torch"
logits, labels = torch.randn(4, 9), torch.tensor([0, 3, 8, 1])
expected = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1).float()
torch.testing.assert_close(k.token_logprobs(logits, labels), expected)
try:
    with k.use_backend("triton"):
        k.kl_penalty(torch.zeros(3), torch.zeros(3))
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("the triton backend ran without triton")
print("ok")
"""
    assert run_python(code, str(tmp_path)).strip() == "ok"


def test_repository_root_never_loads_a_second_copy():
    """From the root, the folders are importable under their short names: `kernels` must not
    register the fusedrl:: ops again (it stands aside, and transformers, which probes for Hugging
    Face's `kernels`, still imports), `engine` refuses with a one-line error."""
    code = """
import fusedrl.kernels, torch
import kernels
assert not hasattr(kernels, "token_logprobs") and kernels.__file__ is None
import transformers.activations  # probes `kernels` (hub kernels) at import
try:
    import engine
except ImportError as e:
    assert "import it by that name" in str(e) and "\\n" not in str(e), e
else:
    raise AssertionError("engine imported under its short name")
print("ok")
"""
    assert run_python(code, ROOT).strip().splitlines()[-1] == "ok"


@pytest.mark.parametrize("name", ["fusedrl.engine", "fusedrl.kernels, fusedrl.engine.stages.sft"])
def test_import_is_light(name, tmp_path):
    """Importing the engine package pulls in neither torch nor transformers (its public names load
    on first use); the kernels package and the stages need torch but not transformers (imported
    when a model's config or tokenizer is read)."""
    code = f"import sys, {name}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    expected = "[]" if name == "fusedrl.engine" else "['torch']"
    assert run_python(code, str(tmp_path)).strip() == expected
