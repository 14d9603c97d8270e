"""`training.precision` on CPU: bf16 autocast only where the CPU has bf16 instructions and it is faster here.

The decision is tested with mocked CPU flags and mocked timings (no test depends on this machine's CPU or load);
the numerics with real bf16 autocast on a tiny model (any x86 or ARM CPU runs it, emulated where it must be).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune import precision as P
from finetune.engine import LocalEngine
from finetune.errors import UserError
from finetune.recipe import load_recipe
from llama_core.config import get_config
from llama_core.model import Transformer

ROOT = Path(__file__).resolve().parents[2]
AVX2 = frozenset({"avx2"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})


@pytest.fixture
def cpu(monkeypatch):
    """`cpu(flags, speedup)`: this process sees a CPU with `flags` on which bf16 products are `speedup` times as
    fast; returns the list of shapes measured (a fresh cache per test)."""
    monkeypatch.delenv(P.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(P, "_speedups", {})
    measured = []

    def setup(flags: frozenset[str], speedup: float | None = None) -> list:
        monkeypatch.setattr(P, "cpu_flags", lambda: flags)

        def measure(shape):
            if speedup is None:
                raise AssertionError("measured, but the decision needs no measurement")
            measured.append(shape)
            return speedup
        monkeypatch.setattr(P, "measure_bf16_speedup", measure)
        return measured
    return setup


def test_auto_on_an_avx2_only_cpu_is_fp32_without_measuring(cpu):
    cpu(AVX2)
    p = P.resolve_precision("auto", "cpu")
    assert (p.name, p.weights, p.autocast) == ("fp32", torch.float32, None)
    assert "no bf16 instructions" in p.reason and "avx2" in p.reason


@pytest.mark.parametrize("flags,named", [(AVX512_BF16, "AVX512-BF16"), (AMX, "AMX"), (frozenset({"bf16"}), "ARM BF16")])
def test_auto_is_bf16_autocast_where_the_cpu_has_bf16_and_it_is_faster(cpu, flags, named):
    measured = cpu(flags, speedup=2.3)
    p = P.resolve_precision("auto", "cpu", shape=(2048, 512, 1376))
    assert (p.name, p.autocast) == ("bf16", torch.bfloat16)
    assert p.reason.startswith("auto: bf16 autocast") and named in p.reason and "2.3x" in p.reason
    assert measured == [P.probe_shape((2048, 512, 1376))]


@pytest.mark.parametrize("speedup,name", [(1.1, "fp32"), (P.MIN_SPEEDUP - 0.01, "fp32"), (P.MIN_SPEEDUP, "bf16")])
def test_auto_needs_a_measured_gain(cpu, speedup, name):
    cpu(AVX512_BF16, speedup)
    p = P.resolve_precision("auto", "cpu", shape=(4096, 128, 352))
    assert p.name == name
    if name == "fp32":
        assert p.autocast is None and f"only {speedup:.2f}x" in p.reason and "AVX512-BF16" in p.reason


def test_the_measurement_is_made_once_per_process_and_probe(cpu):
    measured = cpu(AVX512_BF16, speedup=2.0)
    for _ in range(3):
        P.resolve_precision("auto", "cpu", shape=(2048, 512, 1376))
    P.resolve_precision("auto", "cpu", shape=(2048, 512, 1400))  # cut to the same probe: no new measurement
    assert len(measured) == 1
    P.resolve_precision("auto", "cpu", shape=(4096, 128, 352))
    P.resolve_precision("auto", "cpu")  # DEFAULT_SHAPE, llama-58m's: measured already
    assert measured == [P.probe_shape((2048, 512, 1376)), (4096, 128, 352)]


def test_step_shape_is_a_micro_batch_of_the_recipe_on_its_model():
    recipe = load_recipe(str(ROOT / "recipes" / "quickstart.yaml"), [], check_paths=False)  # 16 rows x 256
    assert P.step_shape(recipe, get_config("quickstart")) == (4096, 128, 352)


def test_explicit_bf16_on_a_cpu_without_bf16_instructions_names_the_flags(cpu):
    cpu(AVX2)
    with pytest.raises(UserError) as e:
        P.resolve_precision("bf16", "cpu")
    message = str(e.value)
    assert "training.precision: bf16" in message and "no bf16 instructions (AVX512-BF16 or AMX)" in message
    assert "flags found: avx2; not found: avx512_bf16, amx_bf16" in message and "use fp32" in message


@pytest.mark.parametrize("flags", [AVX512_BF16, AMX])
def test_explicit_bf16_is_autocast_with_a_bf16_frozen_base_without_measuring(cpu, flags):
    cpu(flags)
    p = P.resolve_precision("bf16", "cpu")
    assert (p.name, p.weights, p.autocast) == ("bf16", torch.bfloat16, torch.bfloat16)
    assert "training.precision: bf16" in p.reason


@pytest.mark.parametrize("flags", [AVX2, AVX512_BF16, AMX])
def test_fp32_is_forced_whatever_the_cpu(cpu, flags):
    cpu(flags)  # measuring would fail the test
    p = P.resolve_precision("fp32", "cpu", shape=(2048, 512, 1376))
    assert (p.name, p.weights, p.autocast) == ("fp32", torch.float32, None)


def test_fp16_on_cpu_is_refused(cpu):
    cpu(AMX)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        P.resolve_precision("fp16", "cpu")


def test_deepspeed_on_cpu_stays_fp32(cpu):
    cpu(AMX)
    assert P.resolve_precision("auto", "cpu", deepspeed=True).name == "fp32"
    with pytest.raises(UserError, match="bf16 under DeepSpeed needs a CUDA GPU"):
        P.resolve_precision("bf16", "cpu", deepspeed=True)


@pytest.mark.parametrize("value,flags,name", [("0", AMX, "fp32"), ("1", AMX, "bf16"), ("1", AVX2, "fp32")])
def test_the_environment_pins_auto_without_measuring(cpu, monkeypatch, value, flags, name):
    cpu(flags)
    monkeypatch.setenv(P.CPU_BF16_ENV, value)
    p = P.resolve_precision("auto", "cpu")
    assert p.name == name
    if flags is AMX:
        assert f"{P.CPU_BF16_ENV}={value}" in p.reason


def test_a_bad_environment_value_is_a_clear_error(cpu, monkeypatch):
    cpu(AMX)
    monkeypatch.setenv(P.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match=f"{P.CPU_BF16_ENV}='yes': use 0 .* or 1"):
        P.resolve_precision("auto", "cpu")


@pytest.mark.parametrize("text,flags", [
    (("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n\n"
      "processor\t: 1\nflags\t\t: fpu\n"), {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", {"avx2"}),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n", {"bf16"}),
])
def test_cpuinfo_flags_are_read_from_the_first_processor(tmp_path, text, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert P._cpuinfo_flags(str(path)) == flags
    assert P._cpuinfo_flags(str(tmp_path / "missing")) == frozenset()


def test_torch_flags_under_their_cpuinfo_names(monkeypatch):
    caps = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_tile": True, "amx_bf16": True, "sse": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    assert P._torch_flags() == {"avx2", "avx512f", "amx_tile", "amx_bf16"}


def test_torch_flags_on_an_older_torch(monkeypatch):
    """torch 2.5 has no get_capabilities, only private helpers (names that changed between releases)."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    helpers = SimpleNamespace(_is_cpu_support_avx2=lambda: True, _is_cpu_support_avx512=lambda: True,
                              _is_cpu_support_amx_tile=lambda: False, _is_avx512_bf16_supported=lambda: True)
    monkeypatch.setattr(torch._C, "_cpu", helpers)
    assert P._torch_flags() == {"avx2", "avx512f", "avx512_bf16"}


def test_probe_shape_caps_the_work_keeping_tokens_per_weight():
    assert P.probe_shape((4096, 128, 352)) == (4096, 128, 352)  # small already
    tokens, dim, hidden = P.probe_shape((2048, 4096, 14336))  # an 8B model: cut hidden, then tokens
    assert dim == 4096 and hidden == 64 and 6 * tokens * dim * hidden <= P.PROBE_FLOPS * 1.01
    tokens, dim, hidden = P.probe_shape((2048, 512, 1376))
    assert (tokens, dim) == (2048, 512) and hidden < 1376 and 6 * tokens * dim * hidden <= P.PROBE_FLOPS


def test_the_measurement_runs_and_returns_a_ratio():
    assert P.measure_bf16_speedup((64, 32, 48), rounds=1) > 0


# --- numerics: bf16 autocast against fp32 on a tiny model ---

FP32 = P.Precision("fp32", torch.float32, None)
BF16 = P.Precision("bf16", torch.bfloat16, torch.bfloat16)


def _trained_tiny(batch) -> dict:
    """A tiny model after 10 fp32 steps on `batch` (loss ~3, not the flat ln(vocab) of a random model)."""
    model = Transformer(get_config("tiny"))
    model.reset_parameters(seed=0)
    engine = LocalEngine(model, model, torch.optim.AdamW(model.parameters(), lr=1e-2), FP32, torch.device("cpu"))
    for _ in range(10):
        engine.backward(engine.loss_sum(batch) / batch["labels"][:, 1:].numel())
        engine.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _one_step(state: dict, precision: P.Precision, batch) -> dict:
    model = Transformer(get_config("tiny"))
    model.load_state_dict(state)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = LocalEngine(model, model, optimizer, precision, torch.device("cpu"))
    dtypes = []
    hook = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    n = batch["labels"][:, 1:].numel()
    loss = engine.loss_sum(batch) / n
    engine.backward(loss)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    engine.step()
    hook.remove()
    return {"loss": loss, "grads": grads, "after": (engine.loss_sum(batch) / n).item(), "product": dtypes[0],
            "params": {p.dtype for p in model.parameters()},
            "adam": {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim()}}


@pytest.fixture
def one_thread():
    """Numerics, not speed: one thread (on a loaded 2-core machine two OpenMP threads make this tiny model's step
    ~80x slower, waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_autocast_agrees_with_fp32_on_a_tiny_model(one_thread):
    """Tolerances: bf16 keeps 8 significant bits (a relative rounding of 2^-9, 0.2%, on every product input).
    The loss is a mean over 252 tokens computed in fp32 from the fp32 residual stream, so its rounding errors
    average out: within 1% relative (measured: 0.006%). Gradients go back through every bf16 product: within 2%
    relative norm (measured: 0.3%), and yet not equal to fp32's (which would mean autocast never ran). After one
    AdamW step from the same weights, the losses again agree within 1%."""
    x = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x}
    state = _trained_tiny(batch)
    fp32, bf16 = _one_step(state, FP32, batch), _one_step(state, BF16, batch)
    assert (fp32["product"], bf16["product"]) == (torch.float32, torch.bfloat16)  # autocast reached the blocks
    assert bf16["loss"].dtype == torch.float32 and 1 < fp32["loss"].item() < 5
    assert bf16["loss"].item() == pytest.approx(fp32["loss"].item(), rel=0.01)
    difference = ((bf16["grads"] - fp32["grads"]).norm() / fp32["grads"].norm()).item()
    assert 1e-4 < difference < 0.02
    assert bf16["after"] == pytest.approx(fp32["after"], rel=0.01) and bf16["after"] < bf16["loss"].item()
    # fp32 master weights and optimizer state under bf16 autocast
    assert bf16["params"] == {torch.float32} and bf16["adam"] == {torch.float32}
