"""The Triton kernels against the plain-torch references: on the GPU when there is one, else on CPU tensors through
Triton's interpreter (TRITON_INTERPRET=1), which runs the same kernel code with numpy. Skipped without Triton."""
import os
import subprocess
import sys

import pytest
import torch

from llama_core import kernels
from llama_core.model import rotary_cos_sin

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton decorates its own library at import, so the interpreter must be on before anything imports it: on CPU
# the kernel tests run in a child pytest process started with TRITON_INTERPRET=1.
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def needs_kernels(test):
    """A kernel test: on the GPU (marked gpu: bench/gpu_check.sh selects it), or in the interpreter's process."""
    skip = pytest.mark.skipif(DEVICE == "cpu" and not IN_INTERPRETER, reason="run in the interpreter's process")
    return pytest.mark.gpu(skip(test))


@pytest.mark.skipif(DEVICE == "cuda" or IN_INTERPRETER, reason="the kernels run directly")
def test_kernels_in_triton_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.fixture
def tk():
    """The fused ops with every one forced through Triton (interpreted on CPU)."""
    with kernels.backend("triton"):
        yield kernels


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()


def value_and_grads(fn, inputs, upstream_seed=9):
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
    return [out.detach(), *grads]


def assert_all_close(ours, theirs, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [32, 48])  # a power of two, and not (masked lanes)
def test_rms_norm(tk, dtype, dim):
    x, w = rand(3, 5, dim, dtype=dtype), rand(dim, seed=1, scale=0.1)
    with torch.no_grad():
        w += 1.0
    assert_all_close(value_and_grads(lambda a, b: tk.rms_norm(a, b, 1e-6), [x, w]),
                     value_and_grads(lambda a, b: kernels.rms_norm_reference(a, b, 1e-6), [x, w]), dtype)
    torch.testing.assert_close(tk.rms_norm_forward(x, w, 1e-6), kernels.rms_norm_reference(x, w, 1e-6))
    assert tk.rms_norm(x, w, 1e-6).grad_fn.__class__.__name__ == "_RMSNormBackward"
    frozen = w.detach()  # no weight gradient wanted
    assert_all_close(value_and_grads(lambda a: tk.rms_norm(a, frozen, 1e-6), [x]),
                     value_and_grads(lambda a: kernels.rms_norm_reference(a, frozen, 1e-6), [x]), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (3, 12)])
def test_rotary(tk, dtype, heads, head_dim):
    B, T = 2, 5
    x = rand(B, T, heads, head_dim, dtype=dtype).transpose(1, 2)  # the model's layout: a transposed view
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 0, 1, 2, 9]], device=DEVICE)
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    assert_all_close(value_and_grads(lambda a: tk.rotary(a, cos, sin), [x]),
                     value_and_grads(lambda a: kernels.rotary_reference(a, cos, sin), [x]), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(tk, dtype):
    gate, up = rand(2, 7, 300, dtype=dtype, scale=3.0), rand(2, 7, 300, dtype=dtype, seed=1)
    assert_all_close(value_and_grads(tk.swiglu, [gate, up]),
                     value_and_grads(kernels.swiglu_reference, [gate, up]), dtype)
    torch.testing.assert_close(tk.swiglu_forward(gate, up), kernels.swiglu_reference(gate, up))


@needs_kernels
@pytest.mark.parametrize("vocab", [50, 5000])  # one block, and several (the online max and sum)
def test_softmax_grad(tk, vocab):
    logits = (torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)) * 4).to(DEVICE)
    targets = torch.tensor([0, vocab - 1, 3, 3, 17, 1], device=DEVICE)
    from llama_core import triton_kernels

    ours, theirs = logits.clone(), logits.clone()
    loss, ref_loss = triton_kernels.softmax_grad_(ours, targets), kernels._TorchOps.softmax_grad_(theirs, targets)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_parity(dtype):
    from llama_core.config import get_config
    from llama_core.model import Transformer

    torch.manual_seed(0)
    model = Transformer(get_config("tiny-gqa")).to(DEVICE, dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        model.kernels = backend  # the model's own setting, as finetune's build sets it
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids)
        loss.backward()
        results[backend] = [loss.detach()] + [p.grad for p in model.parameters()]
    assert_all_close(results["triton"], results["reference"], dtype)
