"""What only a GPU shows about the model: bf16 autocast against fp32, and packed rows attending through the
varlen/flex path (no dense mask) against the dense-mask reference. Marked gpu: bench/gpu_check.sh runs them."""
from __future__ import annotations

import pytest
import torch

from llama_core import model as model_module
from llama_core import packed_attention
from llama_core.config import get_config
from llama_core.model import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 keeps 8 bits of mantissa: a loss of a few units agrees to about 1%, gradients to a few % in norm.
LOSS_RTOL, GRAD_RTOL = 1e-2, 5e-2


def _model(**overrides) -> Transformer:
    model = Transformer(get_config("tiny-gqa", dim=128, n_heads=4, n_kv_heads=2, hidden_dim=384, **overrides))
    model.reset_parameters(seed=0)
    return model.cuda().train()


def _loss_and_grads(model, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def test_bf16_autocast_agrees_with_fp32():
    model = _model()
    ids = torch.randint(0, 320, (4, 256), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, batch, autocast=False)
    loss, grads = _loss_and_grads(model, batch, autocast=True)
    assert abs(loss - ref_loss) <= LOSS_RTOL * ref_loss
    worst = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst <= GRAD_RTOL, worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_rows_skip_the_dense_mask(monkeypatch, dtype):
    model = _model().to(dtype)
    positions = packed_attention.random_packed_positions(2, 512, 64, torch.Generator().manual_seed(1), pad=7)
    ids = torch.randint(0, 320, (2, 512), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": positions.cuda()}
    monkeypatch.setenv(packed_attention.ENV_VAR, "dense")
    ref_loss, ref_grads = _loss_and_grads(model, batch, autocast=False)
    monkeypatch.delenv(packed_attention.ENV_VAR)
    assert packed_attention.choose_impl(torch.device("cuda"), dtype, model.config.head_dim) is not None

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the dense (T x T) mask was built for packed rows on CUDA")

    monkeypatch.setattr(model_module, "attention_mask_for", no_dense_mask)
    loss, grads = _loss_and_grads(model, batch, autocast=False)
    assert abs(loss - ref_loss) <= LOSS_RTOL * ref_loss
    worst = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst <= GRAD_RTOL, worst
