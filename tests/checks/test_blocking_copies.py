"""engine/ builds no tensor from Python data straight on a device: `torch.tensor(data, device=...)`
copies from pageable memory and, on a GPU, makes the host wait for every kernel already queued
(engine/data/device_tensors.py says why), a sync no dispatcher-level counter sees;
`device_tensor(data, dtype, device)` enqueues the copy instead. Read from the source (an AST walk of
every engine module), so a new call fails here, not in a GPU profile."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# (file, function): why its copy may wait.
ALLOWED = {
    ("engine/parallel/expert_parallel.py", "agree"):
        "the value is read on the host right after its all-reduce (the forward's one host read); "
        "the parallel layout imports nothing of engine/data",
    ("engine/train/fused_adamw.py", "load_state_dict"): "a resume's, once per parameter",
}


def blocking_builds(source: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of each `torch.tensor(..., device=X)` whose X is not "cpu"."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "tensor" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            device = next((k.value for k in node.keywords if k.arg == "device"), None)
            if device is not None and not (isinstance(device, ast.Constant)
                                           and device.value == "cpu"):
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)
    visit(ast.parse(source), "<module>")
    return found


def test_the_engine_sends_python_data_to_a_device_without_waiting():
    calls = [(str(path.relative_to(ROOT)), function, line)
             for path in sorted((ROOT / "engine").rglob("*.py"))
             for function, line in blocking_builds(path.read_text(encoding="utf-8"))]
    found = [f"{path}:{line} ({function})" for path, function, line in calls
             if (path, function) not in ALLOWED]
    assert not found, ("torch.tensor(..., device=) waits for the device; use "
                       f"engine.data.device_tensors.device_tensor: {found}")
    assert set(ALLOWED) <= {(path, function) for path, function, _ in calls}, "a stale allowance"


def test_the_check_finds_a_call_and_leaves_the_host_s_alone():
    source = ("import torch\n"
              "def f(rows, device):\n"
              "    a = torch.tensor(rows, device='cpu')\n"
              "    b = torch.tensor(rows)\n"
              "    return torch.tensor(rows, dtype=torch.long, device=device)\n")
    assert blocking_builds(source) == [("f", 5)]
