"""The sampler's routing records: every forwarded token's experts, shared prompt blocks and padded
decode graphs included, equal to what a packed training forward over the same tokens chooses."""
import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.runner import _DecodeGraphs
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.moe import routing_trace
from engine_testing import random_prompts
from moe_testing import make_moe_model


@pytest.mark.parametrize("graphs", [False, True])
def test_records_are_the_training_forward_s_choices(tmp_path, graphs, device):
    make_moe_model("qwen3_moe").save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="float32", block_size=4, max_num_seqs=6, record_routing=True,
              device=device,
              use_cuda_graphs=graphs)
    # the graph bookkeeping (padded batch sizes), replayed eagerly
    if graphs and device.type != "cuda":
        llm.runner.graphs = _DecodeGraphs(llm.runner, max_num_seqs=6, capture=False)
    prompts = random_prompts([9, 5], seed=3)
    outputs = llm.generate(prompts, SamplingParams(n=2, temperature=1.0, seed=1, max_new_tokens=7))
    model = llm.model
    for prompt, out in zip(prompts, outputs):
        for c in out.outputs:
            ids = prompt + c.token_ids
            assert len(c.routing_rows) == len(ids) and c.routing_rows[-1] == -1 and min(c.routing_rows[:-1]) >= 0
            recorded = llm.device_routing(c.routing_rows)  # [len, 1 sparse layer, 2]
            with torch.no_grad(), routing_trace(model) as trace:
                model.forward_packed(torch.tensor(ids, device=device), [len(ids)])
            assert torch.equal(recorded[:-1, 0].long(), trace.chosen[1][:-1])
            assert (recorded[-1] == -1).all()
    # The n samples of a prompt share its full blocks: their prompt rows are the same records.
    first, second = outputs[0].outputs
    assert first.routing_rows[:8] == second.routing_rows[:8]


def test_batch_invariant_mode_is_refused_for_moe(tmp_path):
    make_moe_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^batch_invariant=True with a mixture-of-experts model: not supported \(its "
                                          r"expert GEMMs have no batch-invariant mode"):
        LLM(tmp_path, dtype="float32", batch_invariant=True)
    # LLM's arguments are refused by the compatibility table's pairs, named as LLM names them.
    with pytest.raises(ValueError, match=r"^record_routing=True with prefill_chunk=8: not supported \("):
        LLM(tmp_path, dtype="float32", record_routing=True, prefill_chunk=8)
    with pytest.raises(ValueError, match=r"^prefill_chunk=8 with batch_invariant=True: not supported \("):
        LLM(tmp_path, dtype="float32", batch_invariant=True, prefill_chunk=8)
