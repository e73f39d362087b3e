"""On a GPU the batch-invariant mode needs more than equal arithmetic per program: the sampler's steps
and the trainer's forward must run the SAME compiled kernels. Triton compiles one binary per
specialization (dtypes, 16-byte alignment of pointers, ints equal to 1 or multiples of 16, constexprs,
warps, stages), and two binaries may vectorize, and so reduce, differently. This records every launch
of the mode's computing kernels under the interpreter (as tests/tools/static_gpu.py does) during generation
(prefill, decode at batch 3 and 1) and during the trainer's packed forward and head, and checks that
each kernel was specialized identically on both sides."""
import pytest
import torch

from fusedrl import kernels
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.stages.rollout.packs import pack_rollout
from gpucheck.record import recording
from engine_testing import random_prompts
from kernel_testing import needs_interpreter

pytestmark = needs_interpreter  # it records interpreted launches

# The kernels whose arithmetic makes a token's log-prob (not the K/V store, not the draw).
COMPUTING = ("_fixed_tile_linear_kernel", "_sum_pieces_kernel", "_add_rms_norm_kernel", "_rope_kernel",
             "_silu_mul_kernel", "_segment_attention_kernel", "_merge_segments_kernel", "_row_logprobs_kernel")


def specializations(launches: dict) -> dict:
    """kernel name -> set of the recorded specialization keys (recording's: the ints a kernel
    declares do_not_specialize counted by width alone, as the compiler sees them) of its launches."""
    out = {}
    for key, record in launches.items():
        name = record["kernel"].split(":")[1]
        if name in COMPUTING:
            out.setdefault(name, set()).add(key)
    return out


@pytest.mark.parametrize("arch,dtype", [("qwen3", "bfloat16"), ("qwen2", "float32")])
def test_sampler_and_trainer_launch_identically_specialized_kernels(model_dirs, arch, dtype):
    path = model_dirs[arch][0]
    prompts = random_prompts([9, 3, 6], seed=5)
    params = SamplingParams(temperature=1.0, max_new_tokens=3, seed=1)
    sampler_side, trainer_side = {}, {}
    with kernels.use_backend("triton"):
        llm = LLM(path, dtype=dtype, block_size=4, batch_invariant=True)
        with recording(sampler_side):
            outputs = llm.generate(prompts, params) + llm.generate(prompts[0], params)  # batches of 3, 1
        mode = llm.batch_invariant
        packed = pack_rollout([o.prompt_token_ids for o in outputs], [o.outputs[0].token_ids for o in outputs],
                              llm.device)
        with recording(trainer_side), torch.no_grad():
            hidden = mode.packed_hidden(llm.model, packed.input_ids, packed.seqlens)
            mode.head_logprobs(hidden.index_select(0, packed.target_rows), llm.model.lm_head.weight,
                               packed.target_ids, temperature=1.0, with_entropy=True)
    sampled, trained = specializations(sampler_side), specializations(trainer_side)
    assert set(sampled) == set(trained) and len(sampled) >= 6, (sorted(sampled), sorted(trained))
    for name in sampled:
        assert sampled[name] == trained[name], f"{name}: sampler {sampled[name]} vs trainer {trained[name]}"
