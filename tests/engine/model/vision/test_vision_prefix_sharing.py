"""Prefix sharing with images (train.prefix_sharing on a vision-language pack): a GRPO group's rows
read their prompt once, its image features included, at the prompt's own M-RoPE positions; the
logits and gradients equal the unshared pack's (fp32), for both families. Two prompts of the same
tokens over other pixels are other groups."""
import pytest
import torch

from fusedrl.engine.data.vision_processor import ImageInputs
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.rollout.packs import pack_rollout
from fusedrl.kernels import use_backend
from vision_testing import FAMILIES, image_prompt
from vision_testing import vlms  # noqa: F401 (the fixture)

TEXT = [[7, 8, 9], [10, 11]]
GRIDS = [(1, 4, 6), (1, 2, 2)]  # two images: 6 and 1 placeholder tokens


def rollout(config):
    """Rows of three groups, interleaved: two prompts of the same tokens over other pixels (3 and
    2 answers) and a text prompt (2 answers) -> (prompts, answers, images)."""
    a_ids, a_pixels, grids = image_prompt(config, TEXT, GRIDS, seed=1)
    _, b_pixels, _ = image_prompt(config, TEXT, GRIDS, seed=2)
    a, b = ImageInputs(a_pixels, grids), ImageInputs(b_pixels, grids)
    text = [30, 31, 32, 33]
    order = [("a", 0), ("b", 0), ("a", 1), ("t", 0), ("b", 1), ("a", 2), ("t", 1)]
    prompts = [text if g == "t" else a_ids.tolist() for g, _ in order]
    answers = [[40 + 3 * j + k for k in range(2 + j)] for _, j in order]
    images = [{"a": a, "b": b, "t": None}[g] for g, _ in order]
    return prompts, answers, images


def target_logits(model, packed):
    hidden, rows, _ = model.forward_rows(packed)
    return model.compute_logits(hidden.index_select(0, rows))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_group_reads_its_prompt_and_images_once_with_the_unshared_logits(vlms, family,
                                                                            monkeypatch):
    path, hf = vlms[family]
    model = load_model(path).float()
    prompts, answers, images = rollout(hf.config)
    whole = pack_rollout(prompts, answers, "cpu", images=images)
    shared = pack_rollout(prompts, answers, "cpu", share_prompts=True, images=images)
    assert shared.prefix_groups == [0, 1, 0, 2, 1, 0, 2]
    encoded, streams = [], []
    encode, forward_shared = model.encode_images, model.forward_shared

    def count_images(pixels, grids):
        encoded.append(len(grids))
        return encode(pixels, grids)

    def keep_stream(ids, positions, layout, visual=None):
        streams.append((ids, positions))
        return forward_shared(ids, positions, layout, visual)
    monkeypatch.setattr(model, "encode_images", count_images)
    monkeypatch.setattr(model, "forward_shared", keep_stream)
    with use_backend("torch"):
        expected = target_logits(model, whole)
        assert encoded == [2 * 5]  # every row's two images
        got = target_logits(model, shared)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        ((ids, positions),) = streams
        assert encoded[1:] == [2 * 2]  # each group's two images, once
        # The stream: prompt a, a's 3 answers, prompt b, b's 2 answers, the text prompt, its 2.
        p = len(prompts[0])
        assert len(ids) == shared.forwarded_tokens == 2 * p + 4 + sum(map(len, answers))
        assert torch.equal(ids[:p], torch.tensor(prompts[0]))
        # The shared prompt's M-RoPE positions are the prompt's own, an answer's its row's.
        alone = model.mrope_positions(torch.tensor(prompts[0]), [p], images[0].image_grid_thw)[0]
        assert torch.equal(positions[:, :p], alone)
        row = torch.tensor(prompts[0] + answers[0])
        own = model.mrope_positions(row, [len(row)], images[0].image_grid_thw)[0]
        assert torch.equal(positions[:, p:p + len(answers[0])], own[:, p:])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_layout_s_gradients_are_the_unshared_ones(vlms, family):
    """The tower trained too: the shared prompt's features take every answer's gradient."""
    path, hf = vlms[family]
    prompts, answers, images = rollout(hf.config)
    grads = []
    for share in (False, True):
        model = load_model(path).float()
        packed = pack_rollout(prompts, answers, "cpu", share_prompts=share, images=images)
        with use_backend("torch"):
            logits = target_logits(model, packed)
            torch.nn.functional.cross_entropy(logits, packed.target_ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    unshared, shared = grads
    assert shared.keys() == unshared.keys() and any(n.startswith("visual.") for n in shared)
    for name in unshared:
        torch.testing.assert_close(shared[name], unshared[name], atol=1e-6, rtol=1e-4,
                                   msg=name)


def test_micro_batches_and_joined_rounds_keep_each_group_s_images(vlms):
    """A micro-batch holding part of a group (its first row left out) shares the prompt of the rows
    it holds, with their images; two sampling rounds joined (concat_packs, dynamic sampling) keep
    each round's groups apart."""
    from fusedrl.engine.stages.rollout.packs import concat_packs

    path, hf = vlms["qwen2_5_vl"]
    model = load_model(path).float()
    prompts, answers, images = rollout(hf.config)
    whole = pack_rollout(prompts, answers, "cpu", images=images)
    shared = pack_rollout(prompts, answers, "cpu", share_prompts=True, images=images)
    part = [2, 4, 5, 6]  # a1, b1, a2, t1
    joined = concat_packs([shared, shared.select(part)])
    assert joined.prefix_groups[7:] == [3, 4, 3, 5]
    with torch.no_grad(), use_backend("torch"):
        expected = target_logits(model, whole)
        targets = torch.arange(len(whole.target_counts)).repeat_interleave(
            torch.tensor(whole.target_counts))
        of_part = torch.cat([expected[targets == r] for r in part])
        torch.testing.assert_close(target_logits(model, shared.select(part)), of_part,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(target_logits(model, joined),
                                   torch.cat([expected, of_part]), atol=1e-5, rtol=0)
