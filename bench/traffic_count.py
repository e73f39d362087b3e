"""Count the bytes every tensor operation reads and writes, and the host syncs, under a
TorchDispatchMode.

Rules: a view or an allocation moves nothing; an op reads each tensor input once and writes each
tensor output once, and each tensor argument it mutates (`Tensor(a!)` in its schema) once more
(a fused custom op, such as fusedrl::token_logprobs_fwd or fusedrl::add_rms_norm, is one op: its
inputs and outputs once, whatever it does inside); gathers read only what they gather (embedding,
index_select, index: the output plus the indices); a scatter into a buffer (index_put_,
index_copy_) reads and writes only the values put, not the whole buffer. The paged-KV ops touch
only part of the pool they are given (OP_RULES): fusedrl::store_kv writes the new rows,
fusedrl::paged_decode and the exact mode's fusedrl::segment_attention read each query's context
(and round-trip their fp32 partial results, the one intermediate each keeps in memory); the exact
mode's fusedrl::fixed_tile_linear also round-trips its fp32 partial tiles when it splits K. Host
syncs: item /
bool(tensor) / int(tensor) (aten._local_scalar_dense), nonzero and the other ops whose output size
depends on data, tolist, cpu and numpy (patched on Tensor while counting).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# No kernel, no bytes: allocations, detaching, and promote_types (a dtype answered on the host,
# which the dispatcher still sees).
FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
        aten.detach.default, aten.lift_fresh.default, aten.set_.source_Storage_storage_offset,
        aten.promote_types.default}
GATHERS = {aten.embedding.default, aten.index_select.default, aten.index.Tensor}
SCATTERS = {aten.index_put_.default, aten.index_put.default, aten.index_copy_.default,
            aten._index_put_impl_.default}
SYNC_OPS = {aten._local_scalar_dense.default: "item/bool", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten.unique_consecutive.default: "unique",
            aten._unique2.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}
PATCHED_SYNCS = ("tolist", "cpu", "numpy")


def _store_kv_bytes(k, v, k_cache, v_cache, slot_mapping):
    rows = nbytes(k) + nbytes(v)
    return rows + nbytes(slot_mapping), rows


def _paged_decode_bytes(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits):
    batch, heads, dim = q.shape
    row = k_cache[0, 0].numel() * k_cache.element_size()  # one token's K (or V) in this layer
    context = int(context_lens.sum()) * 2 * row
    partials = batch * heads * num_splits * ((1 << (dim - 1).bit_length()) + 1) * 4  # fp32 out + lse
    small = nbytes(q) + nbytes(block_tables) + nbytes(context_lens)
    return small + context + partials, nbytes(q) + partials


def _rope_store_decode_bytes(q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping,
                             block_tables, context_lens, scale, num_splits):
    """paged_decode's bytes over the cached context (each row's own token comes in k, v instead of
    from the pages), plus the new K/V written and each row's cos/sin read."""
    live = int((slot_mapping >= 0).sum())
    row = k_cache[0, 0].numel() * k_cache.element_size()
    new = nbytes(k) + nbytes(v)
    read, written = _paged_decode_bytes(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    angles = 2 * q.shape[0] * q.shape[2] * cos_table.element_size()
    return (read - 2 * live * row + new + angles + nbytes(positions) + nbytes(slot_mapping),
            written + new)


def _sample_bytes(logits, temperatures, top_ks, top_ps, seeds, positions, min_ps, *windows):
    """The logits and the rows' parameters read, tokens and log-probs written; the key windows are
    touched only at the few keys near a row's cut (tests/tools/traffic_kernels.py counts those)."""
    rows = logits.shape[0]
    params = sum(map(nbytes, (temperatures, top_ks, top_ps, seeds, positions, min_ps)))
    return nbytes(logits) + params, rows * (8 + 4)


def _segment_attention_bytes(q, k_rows, v_rows, positions, seq_index, page_table, page, segment, max_position,
                             segment_programs):
    heads, dim = q.shape[1:]
    row = k_rows[0].numel() * k_rows.element_size()  # one token's K (or V) in this layer
    context = int((positions + 1).sum()) * 2 * row
    segments = int((positions // segment + 1).sum())
    partials = segments * heads * (max(16, 1 << (dim - 1).bit_length()) + 2) * 4  # fp32 output, max and sum
    small = nbytes(q) + nbytes(positions) + nbytes(seq_index) + nbytes(page_table)
    return small + context + partials, nbytes(q) + partials


def _fixed_tile_linear_bytes(x, weight, bias, out_dtype):
    from fusedrl.kernels.invariant.fixed_tile_matmul import SPLIT_K
    n, k = x.shape
    out = n * weight.shape[0] * torch.empty(0, dtype=out_dtype).element_size()
    pieces = -(-k // SPLIT_K)
    partials = pieces * n * weight.shape[0] * 4 if pieces > 1 else 0  # fp32 partial tiles, then summed
    return nbytes(x) + nbytes(weight) + (nbytes(bias) if bias is not None else 0) + partials, out + partials


# (bytes read, bytes written) of ops that are not "each argument and result once": ops given a whole
# KV pool but touching a part of it, and ops that keep an intermediate in memory.
OP_RULES = {"fusedrl::store_kv": _store_kv_bytes, "fusedrl::paged_decode": _paged_decode_bytes,
            "fusedrl::rope_store_decode": _rope_store_decode_bytes,
            "fusedrl::sample": _sample_bytes,
            "fusedrl::segment_attention": _segment_attention_bytes,
            "fusedrl::fixed_tile_linear": _fixed_tile_linear_bytes}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def moves_nothing(func) -> bool:
    """A view or an allocation: no kernel, no bytes."""
    return func in FREE or getattr(func, "is_view", False)


def op_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one op by the rules above."""
    if moves_nothing(func):
        return 0, 0
    if func.name() in OP_RULES:
        return OP_RULES[func.name()](*args, **kwargs)
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    if func in GATHERS:
        indices = [t for t in inputs if not t.is_floating_point()]
        written = sum(map(nbytes, outputs))
        return written + sum(map(nbytes, indices)), written
    if func in SCATTERS:
        put = sum(map(nbytes, inputs[1:]))  # the indices and the values, not the destination
        values = nbytes(inputs[-1])
        return put, values
    returned = {o.data_ptr() for o in outputs}  # an in-place aten op returns what it mutates
    mutated = [t for t in _mutated(func, args, kwargs) if t.data_ptr() not in returned]
    return sum(map(nbytes, inputs)), sum(map(nbytes, outputs + mutated))


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments `func` writes in place, by its schema."""
    found = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            found += _tensors(value)
    return found


class TrafficCounter(TorchDispatchMode):
    """Within `with TrafficCounter() as c:`, c.bytes[region] = [read, written], c.ops[region] = ops
    dispatched, c.kernels[region] = those that launch work on the device (all but views and
    allocations; a fused custom op counts as one), c.syncs[kind] = n, c.region_syncs[region][kind] =
    n. `region` is whatever c.region is when the op runs (set it from module hooks).

    stand_ins: {op name: function} computes those ops' results with another implementation of the
    same op (same arguments, same results), e.g. a torch oracle for a Triton kernel too slow to
    interpret at full shape. The op is counted as itself: its bytes depend on its arguments and
    results only."""

    def __init__(self, stand_ins: dict | None = None):
        super().__init__()
        self.stand_ins = stand_ins or {}
        self.region = "other"
        self.bytes = defaultdict(lambda: [0, 0])
        self.syncs = defaultdict(int)
        self.region_syncs = defaultdict(lambda: defaultdict(int))
        self.ops = defaultdict(int)
        self.kernels = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.stand_ins.get(func.name(), func)(*args, **kwargs)
        read, written = op_bytes(func, args, kwargs, out)
        entry = self.bytes[self.region]
        entry[0] += read
        entry[1] += written
        self.ops[self.region] += 1
        self.kernels[self.region] += not moves_nothing(func)
        if func in SYNC_OPS:
            self.count_sync(SYNC_OPS[func])
        return out

    def count_sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        self.region_syncs[self.region][kind] += 1

    @contextlib.contextmanager
    def python_syncs(self):
        """Count Tensor.tolist / cpu / numpy calls (they never reach the dispatcher on a CPU tensor)."""
        originals = {name: getattr(torch.Tensor, name) for name in PATCHED_SYNCS}

        def counting(name):
            def call(tensor, *args, **kwargs):
                self.count_sync(name)
                return originals[name](tensor, *args, **kwargs)
            return call
        for name in PATCHED_SYNCS:
            setattr(torch.Tensor, name, counting(name))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    def attribute(self, modules: dict[str, torch.nn.Module], after: dict[str, str] | None = None):
        """Hooks that set `region` to a module's name while it runs (and to after[name] once it
        returns, else back to "other"). Returns the handles; remove them when done."""
        after = after or {}
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: setattr(self, "region", n)))
            handles.append(module.register_forward_hook(
                lambda *_, n=name: setattr(self, "region", after.get(n, "other"))))
        return handles


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's distinct parameters (a tied embedding counts once)."""
    return sum(nbytes(p) for p in {id(p): p for p in module.parameters()}.values())
