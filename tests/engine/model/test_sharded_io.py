"""Sharded load and streamed export on gloo ranks (sharded_ranks.py under torchrun, 2 and 4 ranks):
every tensor equal to the whole model's (packed q/k/v, tied embeddings, biases, 2-D Shard(0) x
Shard(1) layouts, reward and value models, a LoRA merge into the shards), each rank holding only its
share, and the export the same bytes as one process's."""
import json
from pathlib import Path

import pytest

from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.reward_model import load_or_start_reward_model, save_reward_model
from fusedrl.engine.model.value_model import load_value_model
from dist_testing import run_ranks
from engine_testing import make_hf_model, make_tokenizer

SCRIPT = Path(__file__).with_name("sharded_ranks.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_hf_model("qwen2").save_pretrained(root / "qwen2")  # tied, q/k/v biases
    make_hf_model("llama", vocab_size=301, attention_bias=True, mlp_bias=True).save_pretrained(root / "llama")
    for arch in ("qwen2", "llama"):
        make_tokenizer().save_pretrained(root / arch)
    rm = load_or_start_reward_model(root / "qwen2")
    rm.score.weight.data.normal_()
    save_reward_model(rm, root / "rm")
    return root


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_load_and_export_on_gloo_ranks(models, tmp_path, ranks):
    out = tmp_path / "out"
    out.mkdir()
    result = run_ranks(SCRIPT, models, out, nproc=ranks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((out / "report.json").read_text())
    for what, per_rank in report["local_bytes"].items():
        # No rank holds a whole model: its shards are about 1/ranks of it (rows split unevenly at most).
        assert max(per_rank) <= report["whole_bytes"][what] / ranks * 1.1 + 4096, (what, per_rank)
    # The export of the sharded model is the bytes one process writes of the whole one.
    for arch, max_bytes in (("qwen2", 5 * 2**30), ("llama", 5 * 2**30), ("qwen2_split", 40_000),
                            ("llama_split", 40_000)):
        single = tmp_path / f"single_{arch}"
        save_model(load_model(models / arch.removesuffix("_split")), single, max_shard_bytes=max_bytes)
        weights = sorted(p.name for p in single.glob("model*"))  # the ranks' export also has tokenizer files
        assert weights == sorted(p.name for p in (out / arch).glob("model*"))
        for name in ["config.json", *weights]:
            assert (single / name).read_bytes() == (out / arch / name).read_bytes(), (arch, name)
    assert len(list((out / "qwen2_split").glob("model-*.safetensors"))) > 1
    critic = load_value_model(out / "critic")
    single = tmp_path / "single_critic"
    save_model(load_value_model(models / "llama", start="lm"), single)
    assert (single / "model.safetensors").read_bytes() == (out / "critic" / "model.safetensors").read_bytes()
    assert not critic.value_head.weight.any()
