"""Every result kept in bench/results/ says what made it: each JSON file its commit, device and
versions (`meta`, harness.run_metadata's fields, "unknown" where they were not recorded), a modeled
figure a "modeled" field saying what the model is; each markdown report its commit on its first
lines; each GPU run's folder a README naming its commit."""
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
META_KEYS = {"git_commit", "device", "torch", "triton"}
MODELED = {"long_tail.json", "prefix_sharing.json"}


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: p.name)
def test_each_json_result_carries_its_commit_device_and_versions(path):
    result = json.loads(path.read_text())
    meta = result.get("meta")
    assert isinstance(meta, dict) and META_KEYS <= set(meta), f"{path}: meta {meta}"
    assert meta["git_commit"] and meta["device"], f"{path}: {meta}"
    if path.name in MODELED:
        assert isinstance(result.get("modeled"), str) and result["modeled"], path


@pytest.mark.parametrize("path", sorted(p for p in RESULTS.glob("*.md") if p.name != "README.md"),
                         ids=lambda p: p.name)
def test_each_markdown_report_names_its_commit(path):
    assert "Commit " in path.read_text()[:500], path


def test_each_run_folder_names_its_commit():
    for folder in (p for p in RESULTS.iterdir() if p.is_dir()):
        assert "commit" in (folder / "README.md").read_text().lower(), folder
