"""linear_distill_divergence (the PyTorch row chunks and the fused Triton kernels) against the
float64 reference of TRL's definitions, the reference against textbook divergences, and the
op's edges: masked and fully masked rows, N = 0 and 1, extreme logits, bf16, the sampled and
top-K modes, a teacher that is never differentiated nor written."""
import functools
import math

import pytest
import torch

import fusedrl.kernels.rl.distill as distill_module
import fusedrl.kernels.rl.distill_host as distill_host
from fusedrl.kernels import linear_distill_divergence, reference, use_backend
from kernel_testing import DEVICE, assert_close, assert_within_torch_error, needs_triton

DEVICE_OBJ = torch.device(DEVICE)
BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("triton", marks=needs_triton, id="triton")]


def make_inputs(n_rows, hs, ht, vocab, dtype=torch.float32, *, bias=True, scale=3.0,
                p_valid=0.7):
    """Student [N, hs], teacher [N, ht] (another width), heads with logits of spread ~scale,
    biases, a mask with some rows off."""
    def head(h):
        return (torch.randn(vocab, h, device=DEVICE) * scale / h**0.5).to(dtype)
    inputs = {
        "student_hidden": torch.randn(n_rows, hs, device=DEVICE).to(dtype),
        "student_weight": head(hs),
        "teacher_hidden": torch.randn(n_rows, ht, device=DEVICE).to(dtype),
        "teacher_weight": head(ht),
        "mask": torch.rand(n_rows, device=DEVICE) < p_valid,
    }
    if bias:
        inputs["student_bias"] = (torch.randn(vocab, device=DEVICE) * 0.5).to(dtype)
        inputs["teacher_bias"] = (torch.randn(vocab, device=DEVICE) * 0.5).to(dtype)
    return inputs


STUDENT = ("student_hidden", "student_weight", "student_bias")


def op_on(backend):
    """Our op as a test on `backend` calls it: on triton its fused kernels at every dtype (fp32
    takes cuBLAS's row chunks by default, where the fused GEMMs have no tensor cores)."""
    if backend == "triton":
        return functools.partial(linear_distill_divergence, fuse_matmul=True)
    return linear_distill_divergence


def run(fn, inputs, cast=lambda t: t.detach().clone(), **kwargs):
    """(divergence, entropy, grads of the student's inputs) of fn on copies of the inputs, the
    per-token divergence weighted by a fixed random upstream gradient."""
    xs = {k: cast(v) if v.is_floating_point() else v for k, v in inputs.items()}
    for k in STUDENT:
        if k in xs:
            xs[k].requires_grad_()
    args = [xs.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden",
                                "teacher_weight", "mask")]
    div, entropy = fn(*args[:5], reduction="none", **xs, **kwargs)
    upstream = torch.linspace(-1.0, 2.0, div.numel(), device=div.device).reshape(div.shape)
    (div * upstream.to(div.dtype)).sum().backward()
    grads = [args[0].grad, args[1].grad] + ([xs["student_bias"].grad] if "student_bias" in xs
                                            else [])
    return [div, entropy] + grads


NAMES = ["divergence", "entropy", "grad_hidden", "grad_weight", "grad_bias"]


def compare_fp32(ours, exact, logit_ulp=0.0):
    """TRL's bar: values 1e-5, gradients 1e-4, relative to the largest magnitude of each (at
    least 0.01: an entropy of ~1e-117 at extreme logits is 0 in fp32). logit_ulp: the fp32
    spacing at the largest scaled logit, what a value may move by when logits that large are
    rounded to fp32 (each GEMM rounds its own way: cuBLAS and the CPU differ there)."""
    for i, (name, a, e) in enumerate(zip(NAMES, ours, exact)):
        scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-2)
        tol = (1e-5 if i < 2 else 1e-4) * scale
        assert_close(a, e, atol=max(tol, logit_ulp if i < 2 else 0.0), rtol=0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_float64_reference(backend, beta, temperature):
    """A teacher wider than the student, biases, masked rows, several row chunks with a tail."""
    inputs = make_inputs(13, 6, 10, 37)
    with use_backend(backend):
        ours = run(op_on(backend), inputs, beta=beta, temperature=temperature,
                   chunk_size=4)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=beta, temperature=temperature)
    compare_fp32(ours, exact)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (13,)
    masked = ~inputs["mask"]
    assert torch.all(ours[0][masked] == 0) and torch.all(ours[1][masked] == 0)
    assert torch.all(ours[2][masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_within_pytorchs_own_error(backend, beta):
    """bf16 heads round their matmul like the model's own: our error against the float64 oracle is
    bounded by PyTorch's at bf16 (the reference run on the same bf16 inputs)."""
    inputs = make_inputs(9, 8, 12, 45, torch.bfloat16)
    with use_backend(backend):
        ours = run(op_on(backend), inputs, beta=beta, temperature=0.7)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=beta, temperature=0.7)
    lowp = run(reference.linear_distill_divergence, inputs, beta=beta, temperature=0.7)
    for name, a, e, t in zip(NAMES, ours, exact, lowp):
        assert_within_torch_error(a, e, t, name=name, slack=4.0, atol=1e-3)


def test_reference_is_the_textbook_divergence():
    """The oracle itself: forward and reverse KL as torch.distributions computes them, the JSD
    from its mixture written out, the entropy as Categorical's, at temperature 0.7."""
    zs, zt = torch.randn(5, 17, dtype=torch.float64) * 3, torch.randn(5, 17, dtype=torch.float64)
    ps = torch.distributions.Categorical(logits=zs / 0.7)
    pt = torch.distributions.Categorical(logits=zt / 0.7)
    kl = torch.distributions.kl_divergence
    for beta, expected in ((0.0, kl(pt, ps)), (1.0, kl(ps, pt))):
        assert_close(reference_terms(zs, zt, beta, 0.7), expected, atol=1e-12, rtol=1e-12,
                     name=f"beta={beta}")
    mix = torch.distributions.Categorical(probs=0.6 * ps.probs + 0.4 * pt.probs)
    assert_close(reference_terms(zs, zt, 0.4, 0.7), 0.4 * kl(pt, mix) + 0.6 * kl(ps, mix),
                 atol=1e-12, rtol=1e-12, name="jsd")
    eye = torch.eye(17, dtype=torch.float64)
    _, entropy = reference.linear_distill_divergence(zs, eye, zt, eye, None, temperature=0.7,
                                                     reduction="none")
    assert_close(entropy, ps.entropy(), atol=1e-12, rtol=1e-12, name="entropy")


def reference_terms(zs, zt, beta, temperature):
    """The reference's per-token divergence of raw logits (identity heads)."""
    eye = torch.eye(zs.shape[-1], dtype=zs.dtype)
    return reference.linear_distill_divergence(zs, eye, zt, eye, None, beta=beta,
                                               temperature=temperature, reduction="none")[0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_torch_backward_matches_finite_differences(beta):
    """The chunked path's own backward (the logit gradient written out per chunk, the head's
    matmuls) against torch.autograd.gradcheck, in float64, with soft-capping and a logit scale."""
    inputs = make_inputs(5, 3, 4, 7, torch.float64)

    def f(h, w, b):
        return linear_distill_divergence(
            h, w, inputs["teacher_hidden"], inputs["teacher_weight"], inputs["mask"], beta, 0.9,
            reduction="none", student_bias=b, student_logit_scale=1.3, student_softcap=4.0,
            teacher_softcap=3.0, chunk_size=2).divergence

    with use_backend("torch"):
        assert torch.autograd.gradcheck(f, [inputs[k].clone().requires_grad_() for k in STUDENT])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_gives_zero_and_zero_gradients(backend):
    inputs = make_inputs(6, 5, 7, 19)
    inputs["mask"] = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    h = inputs["student_hidden"].clone().requires_grad_()
    w = inputs["student_weight"].clone().requires_grad_()
    with use_backend(backend):
        out = op_on(backend)(h, w, inputs["teacher_hidden"], inputs["teacher_weight"],
                                        inputs["mask"], beta=0.5)
    out.divergence.backward()
    assert out.divergence.item() == 0.0 and torch.all(out.entropy == 0)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (1,), (3, 1)], ids=["N=0", "N=1", "T=1"])
def test_empty_single_row_and_one_step(backend, lead):
    """N = 0, N = 1, and [B, T=1, H] host inputs with a masked row."""
    n_rows = math.prod(lead)
    inputs = make_inputs(n_rows, 4, 6, 11, p_valid=1.0)
    if len(lead) == 2:
        inputs["mask"][1] = False
    inputs = {k: t.reshape(*lead, *t.shape[1:]) if k in ("student_hidden", "teacher_hidden",
                                                          "mask") else t
              for k, t in inputs.items()}
    with use_backend(backend):
        ours = run(op_on(backend), inputs, beta=0.5)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=0.5)
    compare_fp32(ours, exact)
    assert ours[0].shape == lead and ours[2].shape == (*lead, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_finite_logits(backend, beta):
    """Logits of spread ~1e3 (finite): most probabilities underflow to 0 in fp32, log-probs do
    not; no NaN, still within the bar of the float64 result."""
    inputs = make_inputs(7, 5, 9, 23, scale=1500.0)
    with use_backend(backend):
        ours = run(op_on(backend), inputs, beta=beta, temperature=0.7)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=beta, temperature=0.7)
    assert all(torch.isfinite(t).all() for t in ours)
    logits = torch.addmm(inputs["student_bias"].double(), inputs["student_hidden"].double(),
                         inputs["student_weight"].double().T) / 0.7
    compare_fp32(ours, exact, logit_ulp=torch.finfo(torch.float32).eps * logits.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_host_shapes_and_a_frozen_teacher(backend):
    """[B, T, H] inputs with a float mask (TRL's completion_mask); mean, sum and
    num_items_in_batch; the teacher's tensors get no gradient and keep their values."""
    inputs = make_inputs(12, 5, 8, 21)
    lead = (3, 4)
    h = inputs["student_hidden"].reshape(*lead, 5)
    th = inputs["teacher_hidden"].reshape(*lead, 8).clone().requires_grad_()
    tw = inputs["teacher_weight"].clone().requires_grad_()
    before = (th.detach().clone(), tw.detach().clone())
    mask = inputs["mask"].reshape(lead).float()
    args = (h, inputs["student_weight"], th, tw, mask)
    with use_backend(backend):
        per_token, entropy = op_on(backend)(*args, beta=0.5, reduction="none")
        mean = op_on(backend)(*args, beta=0.5).divergence
        total = op_on(backend)(*args, beta=0.5, reduction="sum").divergence
        items = op_on(backend)(*args, beta=0.5, num_items_in_batch=40).divergence
    assert per_token.shape == lead and entropy.shape == lead
    assert math.isclose(total.item(), per_token.sum().item(), rel_tol=1e-6)
    assert math.isclose(mean.item(), total.item() / mask.sum().item(), rel_tol=1e-6)
    assert math.isclose(items.item(), total.item() / 40, rel_tol=1e-6)
    assert not per_token.requires_grad or per_token.grad_fn is not None
    assert th.grad is None and tw.grad is None
    assert torch.equal(th.detach(), before[0]) and torch.equal(tw.detach(), before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_cap_and_logit_scale_as_hosts_pass_them(backend):
    inputs = make_inputs(8, 5, 7, 29)
    options = dict(beta=0.5, temperature=0.8, student_logit_scale=0.5, teacher_logit_scale=1.7,
                   student_softcap=2.5, teacher_softcap=4.0)
    with use_backend(backend):
        ours = run(op_on(backend), inputs, **options)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                **options)
    compare_fp32(ours, exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_mode_is_the_log_ratio_at_the_sampled_token(backend):
    """log p_s(y) - log p_t(y) at y, its gradient d log p_s(y); a masked row's pad label (-100)
    is never read."""
    inputs = make_inputs(11, 6, 9, 31)
    labels = torch.randint(0, 31, (11,), device=DEVICE)
    labels[~inputs["mask"]] = -100
    with use_backend(backend):
        ours = run(op_on(backend), inputs, mode="sampled", labels=labels,
                   temperature=0.7)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                mode="sampled", labels=torch.where(inputs["mask"], labels, 0), temperature=0.7)
    compare_fp32(ours, exact)
    s = reference.linear_token_logprobs(inputs["student_hidden"].double(),
                                        inputs["student_weight"].double(), labels,
                                        bias=inputs["student_bias"].double(), temperature=0.7)
    t = reference.linear_token_logprobs(inputs["teacher_hidden"].double(),
                                        inputs["teacher_weight"].double(), labels,
                                        bias=inputs["teacher_bias"].double(), temperature=0.7)
    assert_close(ours[0], torch.where(inputs["mask"], s - t, 0.0), atol=1e-5, rtol=1e-5,
                 name="log ratio")


def top_k_teacher(inputs, k, temperature):
    """The teacher as a server gives it: its top-K token ids and log-probs at the temperature."""
    z = reference.distill.scaled_logits(inputs["teacher_hidden"], inputs["teacher_weight"],
                                        inputs["teacher_bias"], 1.0, None, temperature)
    logp, ids = torch.log_softmax(z, dim=-1).topk(k, dim=-1)
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logp}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_mode_matches_reference(backend, beta):
    inputs = make_inputs(9, 6, 9, 33)
    teacher = top_k_teacher(inputs, 5, 0.7)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        inputs.pop(name)
    kwargs = dict(beta=beta, temperature=0.7, mode="top_k")

    def fn(h, w, th, tw, mask, **rest):
        return op_on(backend)(h, w, None, None, mask, **rest)

    def ref(h, w, th, tw, mask, **rest):
        return reference.linear_distill_divergence(h, w, None, None, mask, **rest)

    inputs.update(teacher_hidden=torch.empty(0), teacher_weight=torch.empty(0))
    with use_backend(backend):
        ours = run(fn, inputs, **teacher, **kwargs)
    exact = run(ref, inputs, lambda t: t.detach().double(), **teacher, **kwargs)
    compare_fp32(ours, exact)


def test_top_k_with_every_token_is_the_full_divergence():
    """K = V - 1: the tail bucket is the one token left, so the top-K divergence is the full
    one."""
    inputs = make_inputs(6, 5, 7, 13, torch.float64, p_valid=1.0)
    teacher = top_k_teacher(inputs, 12, 1.0)
    full = linear_distill_divergence(inputs["student_hidden"], inputs["student_weight"],
                                     inputs["teacher_hidden"], inputs["teacher_weight"], None,
                                     beta=0.5, student_bias=inputs["student_bias"],
                                     teacher_bias=inputs["teacher_bias"], reduction="none")
    top = linear_distill_divergence(inputs["student_hidden"], inputs["student_weight"], None,
                                    None, None, beta=0.5, student_bias=inputs["student_bias"],
                                    mode="top_k", reduction="none", **teacher)
    assert_close(top.divergence, full.divergence, atol=1e-9, rtol=1e-9, name="divergence")


def test_bad_arguments_are_named():
    x = make_inputs(4, 3, 5, 7)
    args = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
            x["mask"])
    with pytest.raises(ValueError, match="beta"):
        linear_distill_divergence(*args, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        linear_distill_divergence(*args, temperature=0.0)
    with pytest.raises(ValueError, match="vocabularies"):
        linear_distill_divergence(*args[:3], x["teacher_weight"][:6], x["mask"])
    with pytest.raises(ValueError, match="teacher_hidden"):
        linear_distill_divergence(args[0], args[1], x["teacher_hidden"][:3], *args[3:])
    with pytest.raises(ValueError, match="mask"):
        linear_distill_divergence(*args[:4], x["mask"][:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_distill_divergence(*args, reduction="max")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        linear_distill_divergence(*args, reduction="sum", num_items_in_batch=3)
    with pytest.raises(TypeError, match="labels"):
        linear_distill_divergence(*args, mode="sampled")
    with pytest.raises(ValueError, match="labels"):
        linear_distill_divergence(*args, mode="sampled", labels=torch.full((4,), 7))
    with pytest.raises(ValueError, match="top_k"):
        linear_distill_divergence(*args, mode="top_k")
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        linear_distill_divergence(*args[:2], None, None, x["mask"], mode="top_k",
                                  teacher_topk_ids=torch.zeros(4, 7, dtype=torch.long),
                                  teacher_topk_logprobs=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        linear_distill_divergence(*args[:2], None, None, None, mode="top_k",
                                  teacher_topk_ids=torch.full((4, 2), 7),
                                  teacher_topk_logprobs=torch.zeros(4, 2))


@needs_triton
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_kernels_split_the_vocabulary_and_skip_masked_tiles(beta, monkeypatch):
    """The fused path itself (the row-chunked one is made to fail): two vocabulary splits in
    forward (2100 columns, 17 tiles), a first row tile all masked (computed by no program), a
    6-row last tile, six backward vocabulary chunks with a tail."""
    monkeypatch.setattr(distill_module, "chunked_distill", None)
    inputs = make_inputs(70, 8, 12, 2100)
    inputs["mask"][:64] = False
    assert distill_host.vocab_splits(2, 2100, distill_host._sm_count(DEVICE_OBJ))[0] == 2
    with use_backend("triton"):
        ours = run(op_on("triton"), inputs, beta=beta, temperature=0.7, chunk_size=16)
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=beta, temperature=0.7)
    compare_fp32(ours, exact)
    assert torch.all(ours[0][:64] == 0) and torch.all(ours[2][:64] == 0)


@needs_triton
def test_fp32_takes_the_row_chunks_and_16_bit_the_fused_kernels_unless_asked(monkeypatch):
    """fuse_matmul on the triton backend, each time with the other path made to fail: None sends
    fp32 heads to the row chunks and bf16 ones (both heads) to the fused kernels, a bf16 student
    with an fp32 teacher to the chunks; True and False override the dtype; a non-bool is named."""
    inputs = make_inputs(9, 8, 12, 45)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    mixed = {**low, "teacher_hidden": inputs["teacher_hidden"],
             "teacher_weight": inputs["teacher_weight"], "teacher_bias": inputs["teacher_bias"]}
    exact = run(reference.linear_distill_divergence, inputs, lambda t: t.detach().double(),
                beta=0.5, temperature=0.7)
    for case, fuse, path in ((inputs, None, "chunked"), (low, None, "fused"),
                             (mixed, None, "chunked"), (inputs, True, "fused"),
                             (low, False, "chunked")):
        other = "fused_distill" if path == "chunked" else "chunked_distill"
        with use_backend("triton"), monkeypatch.context() as patch:
            patch.setattr(distill_module, other, None)
            ours = run(linear_distill_divergence, case, beta=0.5, temperature=0.7,
                       fuse_matmul=fuse)
        if case is inputs:
            compare_fp32(ours, exact)
        assert torch.isfinite(ours[0]).all() and ours[0].dtype == torch.float32
    with pytest.raises(TypeError, match="fuse_matmul must be a bool or None, got 1"):
        linear_distill_divergence(*[inputs[k] for k in ("student_hidden", "student_weight",
                                                        "teacher_hidden", "teacher_weight",
                                                        "mask")], fuse_matmul=1)


def test_top_k_padding_rows_are_never_read():
    """A masked row's teacher entries may be padding (-1 ids, NaN log-probs): no effect on the
    valid rows, no NaN anywhere, 0 gradient on the masked rows."""
    inputs = make_inputs(6, 5, 7, 13, p_valid=1.0)
    teacher = top_k_teacher(inputs, 4, 1.0)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    padded = {k: v.clone() for k, v in teacher.items()}
    padded["teacher_topk_ids"][~mask] = -1
    padded["teacher_topk_logprobs"][~mask] = float("nan")
    outs = []
    for t in (teacher, padded):
        h = inputs["student_hidden"].clone().requires_grad_()
        out = linear_distill_divergence(h, inputs["student_weight"], None, None, mask, beta=0.5,
                                        mode="top_k", reduction="none", **t)
        out.divergence.sum().backward()
        outs.append((out.divergence, h.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.isfinite(outs[1][1]).all() and torch.all(outs[1][1][~mask] == 0)


@needs_triton
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_custom_op_registrations(beta):
    """fusedrl::linear_distill_fwd's schema, fake tensors (what torch.compile traces with) and
    autograd agree with the op (torch.library.opcheck)."""
    x = make_inputs(5, 4, 6, 20)
    args = (x["student_hidden"].requires_grad_(), x["student_weight"].requires_grad_(),
            x["student_bias"].requires_grad_(), x["teacher_hidden"], x["teacher_weight"], None,
            x["mask"].to(torch.int8), beta, 1.0, 1.3, 16)
    torch.library.opcheck(torch.ops.fusedrl.linear_distill_fwd.default, args)
