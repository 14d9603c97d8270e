"""llama_core.kernels on CPU in fp32: each fused op against its reference (value and gradients), backend switching,
`recompute_saved`, the activation memory the fused ops save in a whole model, and the small-row CPU linear.
The Triton kernels are tested in test_triton_kernels.py."""
import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from llama_core import kernels
from llama_core.model import IGNORE_INDEX, rotary_cos_sin

TOL = dict(atol=1e-5, rtol=1e-5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rand(*shape, seed=0, scale=1.0, shift=0.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).requires_grad_(requires_grad)


def assert_all_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def value_and_grads(fn, inputs, seed=99):
    """fn(*inputs) and its gradients for a random (non-unit) upstream gradient."""
    out = fn(*inputs)
    wrt = [t for t in inputs if t.requires_grad]
    return [out, *torch.autograd.grad(out, wrt, rand(*out.shape, seed=seed, requires_grad=False))]


def op_case(name):
    """(fused, reference, inputs) of one op."""
    if name.startswith("rms_norm"):
        weight = rand(16, seed=1, scale=0.1, shift=1.0, requires_grad=name == "rms_norm")
        return (lambda x, w: kernels.rms_norm(x, w, 1e-6), lambda x, w: kernels.rms_norm_reference(x, w, 1e-6),
                [rand(2, 5, 16, scale=3.0), weight])
    if name == "rotary":
        cos, sin = rotary_cos_sin(torch.stack([torch.arange(5), torch.arange(3, 8)]), 8, 10000.0, torch.float32)
        x = rand(2, 5, 3, 8).transpose(1, 2)  # (B, heads, T, head_dim), a view as in Attention
        return lambda x: kernels.rotary(x, cos, sin), lambda x: kernels.rotary_reference(x, cos, sin), [x]
    return kernels.swiglu, kernels.swiglu_reference, [rand(2, 5, 24, scale=3.0), rand(2, 5, 24, seed=1)]


OPS = ["rms_norm", "rms_norm_frozen_weight", "rotary", "swiglu"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", OPS)
def test_fused_op_matches_reference(name, backend):
    fused, reference, inputs = op_case(name)
    with kernels.backend(backend):
        ours, theirs = value_and_grads(fused, inputs), value_and_grads(reference, inputs)
    assert isinstance(ours[0].grad_fn, torch.autograd.function.BackwardCFunction)  # the fused Function ran
    assert len(ours) == 1 + sum(t.requires_grad for t in inputs)
    assert_all_close(ours, theirs)


@pytest.mark.parametrize("name", OPS)
def test_reference_backend_is_exactly_the_reference(name):
    fused, reference, inputs = op_case(name)
    with kernels.backend("reference"):
        for a, b in zip(value_and_grads(fused, inputs), value_and_grads(reference, inputs), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPS)
def test_no_grad_paths(name):
    fused, reference, inputs = op_case(name)
    expected = reference(*inputs).detach()
    with torch.no_grad():
        out = fused(*inputs)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, **TOL)
    out = fused(*[t.detach() for t in inputs])  # grad enabled, nothing requires it
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, **TOL)


def test_unknown_backend():
    with pytest.raises(ValueError, match="nope") as error:
        with kernels.backend("nope"):
            pass
    assert all(name in str(error.value) for name in ("auto", "torch", "reference"))
    fused, _, inputs = op_case("swiglu")
    assert isinstance(fused(*inputs).grad_fn, torch.autograd.function.BackwardCFunction)  # still "auto"


@pytest.mark.parametrize("need_h,need_w", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_linear_cross_entropy(chunk_size, need_h, need_w):
    h, weight = rand(11, 16, requires_grad=need_h), rand(50, 16, seed=1, requires_grad=need_w)
    targets = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(2))
    loss = kernels.linear_cross_entropy(h, weight, targets, chunk_size)
    ref = kernels.linear_cross_entropy_reference(h, weight, targets)
    torch.testing.assert_close(loss, ref, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear_cross_entropy(h, weight, targets, chunk_size), ref, **TOL)
    wrt = [t for t in (h, weight) if t.requires_grad]
    assert loss.requires_grad == bool(wrt)
    if wrt:
        assert_all_close(torch.autograd.grad(2.5 * loss, wrt), torch.autograd.grad(2.5 * ref, wrt))
        with kernels.backend("reference"):
            again = kernels.linear_cross_entropy(h, weight, targets, chunk_size)
        assert torch.equal(again, ref) and again.grad_fn.name() == ref.grad_fn.name()


@pytest.mark.parametrize("need_w", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_linear_cross_entropy_with_replaced_rows(chunk_size, need_w):
    """rows/row_weight (PEFT's trainable token rows): the loss and gradients of the merged matrix, the gradient of
    the replaced rows going to row_weight, a target among them and one not."""
    h, weight = rand(11, 16, requires_grad=True), rand(50, 16, seed=1, requires_grad=need_w)
    rows, row_weight = torch.tensor([7, 2, 49]), rand(3, 16, seed=3, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(2))
    targets[:2] = torch.tensor([2, 49])
    loss = kernels.linear_cross_entropy(h, weight, targets, chunk_size, rows, row_weight)
    ref = kernels.linear_cross_entropy_reference(h, weight.index_copy(0, rows, row_weight), targets)
    torch.testing.assert_close(loss, ref, **TOL)
    wrt = [h, row_weight] + ([weight] if need_w else [])
    assert_all_close(torch.autograd.grad(1.5 * loss, wrt), torch.autograd.grad(1.5 * ref, wrt))
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear_cross_entropy(h, weight, targets, chunk_size, rows, row_weight),
                                   ref, **TOL)


def test_linear_cross_entropy_replaced_rows_under_autocast():
    """fp32 h and weight under CPU bf16 autocast: the replaced rows' logits in fp32 too, as the `out=` product of the
    others is (autocast does not apply there), so the loss is the merged matrix's."""
    h, weight = rand(11, 16, requires_grad=True), rand(50, 16, seed=1)
    rows, row_weight = torch.tensor([7, 2, 49]), rand(3, 16, seed=3, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h, weight, targets, 4, rows, row_weight)
        merged = kernels.linear_cross_entropy(h, weight.index_copy(0, rows, row_weight.detach()), targets, 4)
    torch.testing.assert_close(loss, merged)


def test_linear_cross_entropy_keeps_one_buffer_across_sizes():
    """The CPU logits buffer outlives the call (no page faults each step): any later size still computes right."""
    weight = rand(50, 16, seed=1)
    for i, (rows, chunk_size) in enumerate([(11, 4), (3, 4), (20, 8), (7, 64), (0, 8)]):
        h = rand(rows, 16, seed=10 + i)
        targets = torch.randint(0, 50, (rows,), generator=torch.Generator().manual_seed(i))
        loss, ref = (fn(h, weight, targets) for fn in (
            lambda *a: kernels.linear_cross_entropy(*a, chunk_size), kernels.linear_cross_entropy_reference))
        torch.testing.assert_close(loss, ref, **TOL)
        assert_all_close(torch.autograd.grad(loss, (h, weight)), torch.autograd.grad(ref, (h, weight)))
    assert [key for key in kernels._logits_buffers if key[0] == 50] == [(50, torch.device("cpu"))]


# --- recompute_saved ---

class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self):
        self.calls += 1
        return self.fn()


def storage_freed(tensor):
    """A callable: whether `tensor`'s storage has been freed (call after dropping your references)."""
    ref = weakref.ref(tensor.untyped_storage())  # the storage's Python object lives as long as the storage

    def freed():
        gc.collect()
        return ref() is None
    return freed


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_saved_rebuilds_once_instead_of_saving(recompute):
    x = rand(4, 8)
    lin1, lin2 = torch.nn.Linear(8, 5, bias=False), torch.nn.Linear(7, 5, bias=False)
    fn = Counted(lambda: x.detach() * 2)
    y = x * 2  # saves nothing of x or y: y stays alive only if something saves it
    freed = storage_freed(y)
    with kernels.recompute_saved(y, fn) if recompute else contextlib.nullcontext():
        outs = [lin1(y), lin2(y[:, 1:])]  # two consumers save y, one through a view with an offset
    del y
    assert freed() == recompute and fn.calls == 0
    upstream = [rand(*o.shape, seed=i + 1, requires_grad=False) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, [x, lin1.weight, lin2.weight], upstream)
    assert fn.calls == int(recompute)
    xd = x.detach() * 2
    assert_all_close(grads, [(upstream[0] @ lin1.weight + F.pad(upstream[1] @ lin2.weight, (1, 0))) * 2,
                             upstream[0].t() @ xd, upstream[1].t() @ xd[:, 1:]])


def test_recompute_saved_nests():
    x, lin = rand(4, 8), torch.nn.Linear(8, 5, bias=False)
    y1, y2 = x * 2, x * 3
    f1, f2 = Counted(lambda: x.detach() * 2), Counted(lambda: x.detach() * 3)
    freed1, freed2 = storage_freed(y1), storage_freed(y2)
    with kernels.recompute_saved(y1, f1), kernels.recompute_saved(y2, f2):
        out = lin(y1) * lin(y2)
    del y1, y2
    assert freed1() and freed2()
    ref = lin(x * 2) * lin(x * 3)
    upstream = rand(*out.shape, seed=1, requires_grad=False)
    assert_all_close(torch.autograd.grad(out, [x, lin.weight], upstream),
                     torch.autograd.grad(ref, [x, lin.weight], upstream))
    assert f1.calls == f2.calls == 1


def test_recompute_saved_is_a_no_op_under_checkpointing():
    x, lin = rand(4, 8), torch.nn.Linear(8, 5, bias=False)
    fn = Counted(lambda: x.detach() * 2)

    def block(x):
        y = x * 2
        with kernels.recompute_saved(y, fn):
            return lin(y).tanh()

    upstream = rand(4, 5, seed=1, requires_grad=False)
    ours = torch.autograd.grad(checkpoint(block, x, use_reentrant=False), [x, lin.weight], upstream)
    assert fn.calls == 0  # the checkpoint's own hooks decide what is saved
    assert_all_close(ours, torch.autograd.grad(lin(x * 2).tanh(), [x, lin.weight], upstream))


# --- whole model ---

def batch(B=2, T=12, vocab=320, seed=0):
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    return ids, labels


def loss_and_grads(model, backend, ids, labels):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with kernels.backend(backend):
        loss = model(ids, labels=labels)
        grads = torch.autograd.grad(2.5 * loss, [p for _, p in named])
    return loss.detach(), dict(zip([n for n, _ in named], grads))


def assert_same(ours, theirs):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=n)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_model_backends_agree(tiny_model, preset):
    model = tiny_model(preset).train()
    ids, labels = batch()
    ours, reference = loss_and_grads(model, "auto", ids, labels), loss_and_grads(model, "reference", ids, labels)
    assert len(ours[1]) == 3 + 9 * model.config.n_layers
    assert_same(ours, reference)
    model.activation_checkpointing = True
    assert_same(loss_and_grads(model, "auto", ids, labels), reference)


def test_lora_backends_agree(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model().train(), LoraConfig(r=4, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(rand(*p.shape, seed=i, scale=0.1))
    ids, labels = batch()
    ours = loss_and_grads(model, "auto", ids, labels)
    assert len(ours[1]) == 2 * 7 * model.config.n_layers and all("lora_" in n for n in ours[1])
    assert all(g.abs().max() > 1e-6 for g in ours[1].values())
    assert_same(ours, loss_and_grads(model, "reference", ids, labels))


class TensorsMade(TorchDispatchMode):
    """Records every tensor the ops make: its storage (weakly), address and size; and the ops called."""

    def __init__(self):
        super().__init__()
        self.storages, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.append((weakref.ref(s), s.data_ptr(), s.nbytes()))
        return out


def activation_bytes(model, ids, labels):
    """Bytes of the storages a training forward creates that are still alive after it (kept for backward)."""
    with TensorsMade() as made:
        loss = model(ids, labels=labels)
    gc.collect()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weight.t() etc. are views of them
    params |= {b.untyped_storage().data_ptr() for b in kernels._logits_buffers.values()}  # a cache, not saved
    alive = {ptr: n for ref, ptr, n in made.storages if ref() is not None and ptr not in params}
    return sum(alive.values()), loss


def test_fused_ops_save_less(tiny_model, monkeypatch):
    model = tiny_model().train()
    ids, labels = batch(T=64)
    with kernels.backend("reference"):
        reference, ref_loss = activation_bytes(model, ids, labels)
    fused, loss = activation_bytes(model, ids, labels)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert fused < 0.7 * reference
    # The normalized inputs of the linear layers and down_proj's input are recomputed, not kept.
    monkeypatch.setattr(kernels, "recompute_saved", lambda tensor, fn: contextlib.nullcontext())
    kept, _ = activation_bytes(model, ids, labels)
    c = model.config
    recomputed = c.n_layers * ids.numel() * (2 * c.dim + c.hidden_dim) * 4
    assert kept - fused >= 0.95 * recomputed


# --- the small-row CPU linear ---

def uses_bmm(fn, *args):
    with TensorsMade() as made:
        out = fn(*args)
    return out, torch.ops.aten.bmm.default in made.ops


@pytest.mark.parametrize("shape", [(1, 32), (3, 32), (16, 32), (2, 3, 32), (2, 4, 32)])
def test_batched_small_row_linear_is_f_linear(shape):
    x, weight = rand(*shape), rand(12, 32, seed=1)
    out, ref = kernels.batched_linear(x, weight, 2), F.linear(x, weight)
    torch.testing.assert_close(out, ref, **TOL)
    upstream = rand(*ref.shape, seed=2, requires_grad=False)
    assert_all_close(torch.autograd.grad(out, [x, weight], upstream), torch.autograd.grad(ref, [x, weight], upstream))


@pytest.mark.parametrize("batched_wins", [True, False])
def test_small_row_linear_takes_what_this_cpu_measured_faster(monkeypatch, batched_wins):
    """The choice is measured on the machine, once per shape: the batched product only where it is faster."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one thread: the batched product is never used")
    measured = []

    def timing(fn):  # the batched product's lambda is the second one timed in each round
        measured.append(fn)
        slow, fast = 1.0, 0.5
        return (fast if batched_wins else slow) if len(measured) % 2 == 0 else (slow if batched_wins else fast)

    monkeypatch.setattr(kernels, "_time_call", timing)
    monkeypatch.setattr(kernels, "_linear_choice", {})
    x, weight = rand(3, 32), rand(6 * threads, 32, seed=1)
    torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight), **TOL)
    assert len(measured) == 10  # the first call measures: 5 alternating rounds
    out, fast = uses_bmm(kernels.linear, x, weight)
    assert fast == batched_wins and len(measured) == 10  # measured once per shape
    torch.testing.assert_close(out, F.linear(x, weight), **TOL)
    uses_bmm(kernels.linear, rand(4, 32), weight)
    assert len(measured) == 20  # another row count is another shape
    out, fast = uses_bmm(kernels.linear, rand(17, 32), weight)
    assert not fast and len(measured) == 20  # many rows: F.linear, nothing to measure


def test_small_row_linear_fallbacks():
    threads = torch.get_num_threads()
    x = rand(3, 32, requires_grad=False)
    if threads >= 2:  # out_features not divisible by the threads
        weight = rand(6 * threads + 1, 32, seed=1, requires_grad=False)
        out, fast = uses_bmm(kernels.linear, x, weight)
        assert not fast
        torch.testing.assert_close(out, F.linear(x, weight), **TOL)
    weight = rand(12, 32, seed=1, requires_grad=False)
    torch.set_num_threads(1)
    try:
        out, fast = uses_bmm(kernels.linear, x, weight)
    finally:
        torch.set_num_threads(threads)
    assert not fast
    torch.testing.assert_close(out, F.linear(x, weight), **TOL)
    with kernels.backend("reference"):
        out, fast = uses_bmm(kernels.linear, x, weight)
    assert not fast and torch.equal(out, F.linear(x, weight))
