"""finetune.lora: PEFT's LoRA layer with the fused forward pass gives PEFT's results with fewer temporaries.

With dropout, ours draws its CPU mask with `dropout_mask` (not torch's bernoulli_): PEFT's side then gets a dropout
module that draws the same mask (`SameMask`): the two draw the same random numbers and agree to fp32 rounding (ours
scales the small product, PEFT the input); the mask's law is tested on its own."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.lora import LoraLinear, dropout_mask, lora_config
from llama_core import kernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SameMask(torch.nn.Module):
    """Dropout as ours draws it on CPU (`dropout_mask`, from the global generator), for PEFT's layers."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep, scale = dropout_mask(x, self.p)
        return torch.where(keep, x, 0.0).mul_(scale)


def adapted(tiny_model, fused: bool, same_mask: bool = True, **kwargs):
    """A tiny model with LoRA on every linear layer of the blocks, B non-zero (else A would get no gradient).
    PEFT's layers (fused=False) draw their dropout masks as ours do, unless not `same_mask` (PEFT as it is)."""
    make = lora_config if fused else LoraConfig
    torch.manual_seed(0)
    model = get_peft_model(tiny_model().train(), make(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))
    if not fused and same_mask and kwargs.get("lora_dropout"):
        for m in model.modules():
            if isinstance(m, PeftLoraLinear):
                m.lora_dropout["default"] = SameMask(kwargs["lora_dropout"])
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model


ROWS, COLS = 2, 16  # the batch of loss_and_grads


def loss_and_grads(model, seed=1):
    ids = torch.randint(0, model.base_model.model.config.vocab_size, (ROWS, COLS),
                        generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(7)  # the same dropout masks for both
    loss = model(input_ids=ids, labels=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) >= 2 * len(TARGETS) * 2  # A and B, 2 layers
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], msg=name)


def test_lora_config_uses_the_fused_layer_only_on_llama_core_linears(tiny_model, hf_twin):
    model = adapted(tiny_model, fused=True)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 2 * len(TARGETS) and all(type(m) is LoraLinear for m in layers)
    hf = get_peft_model(hf_twin(tiny_model()), lora_config(r=4, target_modules=TARGETS))  # torch's nn.Linear
    assert not any(isinstance(m, LoraLinear) for m in hf.modules())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_matches_peft(tiny_model, dropout):
    ours, theirs = adapted(tiny_model, True, lora_dropout=dropout), adapted(tiny_model, False, lora_dropout=dropout)
    ours_result = loss_and_grads(ours)
    rng_after_ours = torch.get_rng_state()
    assert_same(ours_result, loss_and_grads(theirs))
    assert torch.equal(rng_after_ours, torch.get_rng_state())  # the same draws: runs and resumes reproduce
    with torch.no_grad():  # inference keeps the same path
        ids = torch.arange(12).view(1, 12)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_allocates_less(tiny_model, dropout):
    class BytesMade(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not func._schema.is_mutable:  # in-place ops make nothing new
                    self.total += t.untyped_storage().nbytes()
            return out

    made = {}
    for fused in (True, False):
        model = adapted(tiny_model, fused, same_mask=False, lora_dropout=dropout)
        with BytesMade() as mode:
            loss_and_grads(model)
        made[fused] = mode.total
    # With dropout ours draws 16 random bits and a bool per value (a 4x faster draw than PEFT's float mask): part
    # of the saved temporaries is spent there.
    assert made[True] < (0.85 if dropout == 0 else 0.95) * made[False], made


def layer_pair(tiny_model, **kwargs):
    """The same adapted layer (down_proj of block 1) from our model and from PEFT's, both training."""
    ours, theirs = adapted(tiny_model, True, **kwargs), adapted(tiny_model, False, **kwargs)
    pick = lambda model: model.base_model.model.model.layers[1].mlp.down_proj
    assert type(pick(ours)) is LoraLinear and type(pick(theirs)) is PeftLoraLinear
    return pick(ours), pick(theirs)


def layer_step(layer, x, grad, seed=5) -> list[torch.Tensor]:
    """The output, the global RNG state after the forward and after the backward pass, and the gradients of x, A
    and B. The generator moves on between the two passes, as other layers' dropout would move it."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = layer(x)
    rng_forward = torch.get_rng_state()
    torch.rand(1000)
    out.backward(grad)
    lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    result = [out.detach(), rng_forward, torch.get_rng_state(), x.grad] + [p.grad.clone() for p in lora]
    for p in lora:
        p.grad = None
    return result


def test_dropout_mask_has_dropout_s_law():
    x = torch.empty(1000, 1001)  # not a multiple of 4 values
    for p in (0.05, 0.1, 0.5):
        keep, scale = dropout_mask(x, p, torch.Generator().manual_seed(0))
        assert keep.shape == x.shape and keep.dtype == torch.bool
        assert scale == 1 / (1 - round(p * 65536) / 65536) and abs(scale - 1 / (1 - p)) < 1e-4
        dropped = 1 - keep.double().mean().item()
        assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, (p, dropped)  # 5 standard deviations
    a, b = (dropout_mask(x, 0.1, torch.Generator().manual_seed(s))[0] for s in (0, 1))
    assert not torch.equal(a, b) and torch.equal(a, dropout_mask(x, 0.1, torch.Generator().manual_seed(0))[0])
    rows = dropout_mask(torch.empty(64, 1024), 0.5, torch.Generator().manual_seed(0))[0]
    correlation = torch.corrcoef(rows.float())[~torch.eye(64, dtype=torch.bool)]
    assert correlation.abs().max() < 0.2  # rows are not repeats of each other


def test_dropout_is_peft_s_in_one_layer(tiny_model):
    ours, theirs = layer_pair(tiny_model, lora_dropout=0.1)
    x = torch.randn(ROWS, COLS, ours.in_features)
    grad = torch.randn(ROWS, COLS, ours.out_features)
    names = ["output", "RNG after forward", "RNG after backward", "grad x", "grad A", "grad B"]
    for name, got, want in zip(names, layer_step(ours, x, grad), layer_step(theirs, x, grad), strict=True):
        if name.startswith("RNG"):
            assert torch.equal(got, want), name  # the same draws, none in the backward pass
        else:
            torch.testing.assert_close(got, want, msg=name)
    # a new seed, a new mask: dropout did happen
    assert not torch.equal(layer_step(ours, x, grad, seed=6)[0], layer_step(ours, x, grad)[0])


def saved_activation_bytes(model) -> int:
    """Bytes of the distinct tensors other than parameters that autograd keeps for the backward pass of one step.
    (Saved-tensor hooks of our own turn llama_core's recompute_saved off: the model's inputs count as kept.)"""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # saved tensors stay alive: addresses stay distinct
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_and_grads(model)
    return sum(saved.values())


def test_dropout_keeps_no_copy_of_the_input(tiny_model):
    """PEFT keeps dropout(x) for A's gradient (and the float mask, where x needs a gradient): one (tokens x
    in_features) fp32 copy or two per adapted layer. The fused layer keeps what it keeps without dropout, and a
    bool mask: a quarter of one copy."""
    saved = {(fused, p): saved_activation_bytes(adapted(tiny_model, fused, same_mask=False, lora_dropout=p))
             for fused in (True, False) for p in (0.0, 0.1)}
    model = adapted(tiny_model, True)
    values = sum(ROWS * COLS * m.in_features for m in model.modules() if isinstance(m, LoraLinear))
    assert saved[True, 0.1] - saved[True, 0.0] == values, saved  # one byte a value
    assert saved[False, 0.1] - saved[False, 0.0] >= 4 * values, saved  # what the measure would see


def test_dropout_input_goes_through_saved_tensor_hooks(tiny_model):
    """x is saved with ctx.save_for_backward, so llama_core's recompute_saved rebuilds it instead of keeping it."""
    ours, theirs = layer_pair(tiny_model, lora_dropout=0.1)
    source = torch.randn(ROWS, COLS, ours.in_features)
    grad = torch.randn(ROWS, COLS, ours.out_features)
    calls = []

    def step(layer):
        s = source.clone().requires_grad_()
        x = s * 2  # owns its storage, as the normalized inputs of llama_core's linear layers do
        torch.manual_seed(5)
        with kernels.recompute_saved(x, lambda: calls.append(1) or s.detach() * 2):
            out = layer(x)
        out.backward(grad)
        return out.detach(), s.grad, layer.lora_A["default"].weight.grad.clone()

    got = step(ours)
    assert calls == [1]  # rebuilt once, for the backward pass
    for a, b in zip(got, step(theirs)):
        torch.testing.assert_close(a, b)


def test_other_cases_fall_back_to_peft(tiny_model):
    ids = torch.arange(12).view(1, 12)
    ours, theirs = adapted(tiny_model, True), adapted(tiny_model, False)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    assert layer._fusable(x, (), {}) == "default"
    with ours.disable_adapter(), theirs.disable_adapter():  # the base model alone
        assert layer._fusable(x, (), {}) is None
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))
    assert layer._fusable(x.double(), (), {}) is None  # dtypes differ: PEFT's casts
    ours.merge_adapter(), theirs.merge_adapter()
    assert layer._fusable(x, (), {}) is None
    torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))
    ours.unmerge_adapter(), theirs.unmerge_adapter()
    dora, dora_ref = adapted(tiny_model, True, use_dora=True), adapted(tiny_model, False, use_dora=True)
    assert dora.base_model.model.model.layers[0].mlp.up_proj._fusable(
        torch.randn(2, tiny_model().config.dim), (), {}) is None
    assert_same(loss_and_grads(dora), loss_and_grads(dora_ref))


def test_adapter_files_are_peft_s(tiny_model, hf_twin, tmp_path):
    """What the fused layer's model saves loads into transformers + PEFT with the same logits."""
    from peft import PeftModel

    ours = adapted(tiny_model, True).eval()
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(hf_twin(tiny_model()), tmp_path).eval()
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids).logits)


def test_adapters_loaded_back_use_the_fused_layer(tiny_model, tmp_path):
    from finetune.inference import attach_adapter as load_adapter

    ours = adapted(tiny_model, True).eval()
    ours.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(), str(tmp_path)).eval()
    assert sum(isinstance(m, LoraLinear) for m in loaded.modules()) == 2 * len(TARGETS)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), ours(input_ids=ids))


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_token_rows_without_merged_copies(tiny_model, monkeypatch, tied):
    """With PEFT's trainable token rows (lora.train_tokens), the model embeds and scores those rows apart from the
    frozen matrices (llama_core.model._token_rows); the loss and every gradient equal PEFT's merged-matrix path."""
    def run(fast: bool):
        if not fast:
            monkeypatch.setattr(model_module, "_token_rows", lambda module: None)
        rows = {"embed_tokens": [1, 2, 5]} | ({} if tied else {"lm_head": [1, 2, 5]})
        torch.manual_seed(0)
        model = get_peft_model(tiny_model(tie_word_embeddings=tied).train(),
                               lora_config(r=4, lora_alpha=8, target_modules=TARGETS, trainable_token_indices=rows))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        core = model.base_model.model
        assert all((model_module._token_rows(m) is not None) == fast for m in (core.model.embed_tokens, core.lm_head))
        ids = torch.tensor([[1, 5, 9, 2, 5, 7, 1, 3, 2, 2]])  # the trained rows as inputs and as targets
        loss, grads = loss_and_grads_of(model, ids)
        monkeypatch.undo()
        return loss, grads

    from llama_core import model as model_module
    fast, merged = run(True), run(False)
    torch.testing.assert_close(fast[0], merged[0])
    assert fast[1].keys() == merged[1].keys() and sum("trainable_tokens" in n for n in fast[1]) == (1 if tied else 2)
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], merged[1][name], msg=name)


def loss_and_grads_of(model, ids):
    loss = model(input_ids=ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trainable_token_rows_keep_peft_s_forward_where_it_matters(tiny_model):
    """Pre-hooks and global hooks on the embedding take PEFT's own path (PEFT's mixed-adapter batches pass their
    adapter names so); the wrapper's forward hooks (NEFTune's noise, PEFT's make_inputs_require_grad) run on the
    fast path's output; repeated rows take PEFT's path."""
    from llama_core import model as model_module

    def wrapped(rows):
        model = get_peft_model(tiny_model().train(), lora_config(r=4, target_modules=TARGETS,
                                                                 trainable_token_indices={"embed_tokens": rows}))
        return model.base_model.model

    core = wrapped([1, 2])
    embed, ids = core.model.embed_tokens, torch.tensor([[1, 4, 2, 3]])
    fast = model_module._hooks_allow_fast_path
    assert model_module._token_rows(embed) is not None and fast(embed)
    handle = embed.register_forward_pre_hook(lambda module, args: None)
    assert not fast(embed)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert not fast(embed)
    finally:
        handle.remove()
    handle = embed.register_forward_hook(lambda module, args, out: out + 1.0)  # as NEFTune adds its noise
    try:
        assert fast(embed)
        torch.testing.assert_close(core._embed(ids), embed(ids))
        assert torch.equal(core._embed(ids), embed.token_adapter(ids) + 1.0)
    finally:
        handle.remove()
    assert model_module._token_rows(wrapped([5, 2, 5]).model.embed_tokens) is None
