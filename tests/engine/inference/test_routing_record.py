"""The sampler's routing records: every forwarded token's experts, shared prompt blocks and padded
decode graphs included, equal to what a packed training forward over the same tokens chooses,
whichever step kind forwarded the token (decode, chunked prefill, speculative verify) and whichever
request built the sequence (generate, carried answers run as Requests, generate_turns)."""
import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.multi_turn import TurnReply
from fusedrl.engine.inference.decode_graphs import DecodeGraphs
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.sequence import routing_rows
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
        llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=6, capture=False)
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
    with pytest.raises(ValueError, match=r"^batch_invariant=True with prefill_chunk=8: not supported \("):
        LLM(tmp_path, dtype="float32", batch_invariant=True, prefill_chunk=8)


def training_choices(model, ids: list[int], device) -> torch.Tensor:
    """The experts a packed training forward over `ids` chooses [len, sparse layers, k]."""
    with torch.no_grad(), routing_trace(model) as trace:
        model.forward_packed(torch.tensor(ids, device=device), [len(ids)])
    return torch.stack([trace.chosen[layer] for layer in sorted(trace.chosen)], 1)


def check_records(llm, ids: list[int], rows: list[int], device) -> None:
    """Every token of `ids` but the last (never forwarded) has the training forward's experts."""
    assert len(rows) == len(ids) and rows[-1] == -1 and min(rows[:-1]) >= 0, rows
    recorded = llm.device_routing(rows)
    assert torch.equal(recorded[:-1].long(), training_choices(llm.model, ids, device)[:-1])
    assert (recorded[-1] == -1).all()


def test_records_are_the_training_forward_s_whichever_step_and_request_sampled(tmp_path, device):
    make_moe_model("qwen3_moe").save_pretrained(tmp_path)
    prompts = random_prompts([13, 6], seed=5)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=14)

    def engine(**options):
        return LLM(tmp_path, dtype="float32", block_size=4, max_num_seqs=4, record_routing=True,
                   device=device, use_cuda_graphs=False, **options)
    plain = [c.token_ids for o in engine().generate(prompts, greedy) for c in o.outputs]
    # Speculative verify steps (drafts from the repeating greedy text) and prefill chunks.
    for options in (dict(speculative_tokens=3), dict(prefill_chunk=4)):
        llm = engine(**options)
        outputs = llm.generate(prompts, greedy)
        assert [c.token_ids for o in outputs for c in o.outputs] == plain
        for prompt, out in zip(prompts, outputs):
            check_records(llm, prompt + out.outputs[0].token_ids, out.outputs[0].routing_rows, device)
        if "speculative_tokens" in options:
            assert llm.take_speculation()["accepted"] > 0
    # Carried answers prefilled again (chunked too), then decoded on.
    llm = engine(prefill_chunk=5)
    halves = [answer[:len(answer) // 2] for answer in plain]
    carried = llm.run([Request(p, greedy, answer=h, seed=s)
                       for p, h, s in zip(prompts, halves, [1, 2])])
    for prompt, half, seq in zip(prompts, halves, carried):
        assert seq.completion_token_ids == plain[prompts.index(prompt)]
        check_records(llm, seq.token_ids, routing_rows(seq), device)
    # Multi-turn: later turns prefill the environment's tokens on top of the kept blocks.
    llm = engine(speculative_tokens=2)
    replies = {}

    def on_turn_end(row, turn_tokens):
        replies[row] = replies.get(row, 0) + 1
        return TurnReply(done=True) if replies[row] == 3 else TurnReply((20 + row, 30, 40 + replies[row]))
    for prompt, t in zip(prompts, llm.generate_turns(prompts, SamplingParams(temperature=0.0, max_new_tokens=5),
                                                      on_turn_end, max_turns=3)):
        assert t.turns == 3 and not all(t.model_mask)
        check_records(llm, prompt + t.token_ids, t.routing_rows, device)
