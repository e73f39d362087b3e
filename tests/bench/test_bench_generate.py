"""bench/bench_generate.py runs on the CPU (tiny model) and reports the fixed-shape rows and the
mixed-length continuous-batching case. Times are not checked."""
import json
import os
import subprocess
import sys

import pytest
import transformers

from fusedrl.bench import bench_generate
from fusedrl.engine.model.config import ModelConfig

BENCH = os.path.join(os.path.dirname(bench_generate.__file__), "bench_generate.py")


def test_quick_run_reports_fixed_shapes_and_the_mixed_case(tmp_path):
    out = tmp_path / "generate.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--skip-hf", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(out.read_text())
    assert [row["batch"] for row in payload["rows"]] == [1, 4] and all(r["decode_tok_s"] > 0 for r in payload["rows"])
    mixed = payload["mixed"]
    prompts, params = bench_generate.mixed_lengths(bench_generate.parse_args(["--quick"]), 512)
    assert mixed["requests"] == len(prompts) == 8 and mixed["output_tokens"] == sum(p.max_new_tokens for p in params)
    assert all(4 <= len(p) <= 24 for p in prompts) and len({len(p) for p in prompts}) > 1
    assert mixed["output_tok_s"] > 0 and "mixed lengths: 8 requests" in proc.stdout
    # where the call's seconds went: every request prefilled, at least a decode step per token after
    # the first of the longest output, the host's share between steps what is left
    assert mixed["prefill_steps"] >= 1 and mixed["decode_steps"] >= max(p.max_new_tokens for p in params) - 1
    assert 0 < mixed["mean_decode_batch"] <= 8
    parts = mixed["prefill_s"] + mixed["decode_s"] + mixed["between_steps_s"]
    assert mixed["between_steps_s"] >= 0 and parts == pytest.approx(mixed["seconds"])


def test_the_model_shapes_are_ones_the_engine_loads():
    for name, (config_cls, shape, _) in bench_generate.MODELS.items():
        config = ModelConfig.from_hf(config_cls(**shape))
        assert config.vocab_size == 151936 and config.tie_word_embeddings, name
    assert ModelConfig.from_hf(transformers.Qwen3Config(**bench_generate.QWEN3_06B)).qk_norm


@pytest.mark.parametrize("overlap", [False, True])
def test_step_times_count_each_decode_step_once_with_or_without_steps_launched_ahead(overlap):
    """time_ours' decode figures with decode steps launched ahead (forced on here; a GPU's
    default) and without: every token after a row's first is a decode row, counted once, and the
    decode seconds are a share of the call's."""
    import shutil

    import torch

    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.sampling_params import SamplingParams

    path, _ = bench_generate.build_model_dir(bench_generate.parse_args(["--quick"]), "cpu",
                                             torch.float32)
    try:
        llm = LLM(path, kv_cache_memory=64 << 20, overlap_decode=overlap)
        prompts = torch.randint(0, llm.config.vocab_size, (3, 9),
                                generator=torch.Generator().manual_seed(0)).tolist()
        params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        total, decode_s, decode_rows, outputs = bench_generate.time_ours(llm, prompts, params)
        assert decode_rows == 3 * 11 and 0 < decode_s < total
        assert llm.step == llm.__class__.step.__get__(llm)  # the timers are taken off again
    finally:
        shutil.rmtree(path)
