"""On a machine without `datasets` (the GPU image has none): the engine imports, JSONL prompts are
read without touching it, and a JSON file is refused in one line that names the package. Run in a
fresh interpreter whose `import datasets` fails."""
import json
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["datasets"] = None  # `import datasets` raises ImportError, as where it is missing
sys.path[:0] = [{tests!r}, {engine_tests!r}]
from fusedrl.engine import api, cli  # noqa: F401  the entry points and what they import
from fusedrl.engine.stages import rm, sft  # noqa: F401
from fusedrl.engine.stages.ppo import trainer  # noqa: F401
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.data.records import DataError
from fusedrl.engine.data.sources import read_records
from engine_testing import make_tokenizer

rows, truncated = load_prompts({jsonl!r}, make_tokenizer(), 32, 128)
print("prompts", len(rows), truncated)
try:
    read_records({json_file!r}, dict)
except DataError as e:
    print("refused", e)
assert sys.modules["datasets"] is None
"""


def test_jsonl_prompts_are_read_where_datasets_cannot_be_imported(tmp_path):
    rows = [{"prompt": "abc"}, {"prompt": "a longer prompt"}]
    jsonl, json_file = tmp_path / "p.jsonl", tmp_path / "p.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    json_file.write_text(json.dumps(rows))
    script = SCRIPT.format(tests=str(TESTS), engine_tests=str(TESTS / "engine"), jsonl=str(jsonl),
                           json_file=str(json_file))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "prompts 2 0" in lines
    assert lines[-1] == (f"refused {json_file}: reading it needs the `datasets` package, which is "
                         "not installed (pip install datasets), or give the rows as a .jsonl file")
