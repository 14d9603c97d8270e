import copy

import pytest
import torch
import torch.nn.functional as F

from llama_core.model import IGNORE_INDEX, LMHead, count_targets

TOL = 1e-5


def batch(B: int = 2, T: int = 12, vocab: int = 320, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[-1, -3:] = IGNORE_INDEX  # padding
    return ids, labels


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}), ("tiny-gqa", {}),
    ("tiny", {"rope_theta": 1e6, "norm_eps": 1e-5}),  # Llama-2 style settings: a wrong theta would show here
    ("tiny", {"dim": 40, "n_heads": 4, "hidden_dim": 77}),  # head_dim 10, odd FFN size
    # Llama 3.2's layout: tied head, GQA, llama3 rope scaling whose original context (16) the 40 positions exceed,
    # so that scaled, smoothed and kept frequencies all take part.
    ("tiny-gqa", {"tie_word_embeddings": True, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    ("tiny", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
], ids=["tiny", "tiny-gqa", "theta-1e6", "head-dim-10", "llama3.2-layout", "linear-rope"])
def test_parity_with_transformers(tiny_model, hf_twin, preset, overrides):
    model = tiny_model(preset, **overrides)
    twin = hf_twin(model)
    assert twin.config._attn_implementation == "sdpa"
    assert (twin.lm_head.weight is twin.model.embed_tokens.weight) == model.config.tie_word_embeddings
    ids, labels = batch(T=40 if model.config.rope_scaling else 12)
    with torch.no_grad():
        assert max_diff(model(ids), twin(ids).logits) <= TOL
    loss, twin_loss = model(ids, labels=labels), twin(ids, labels=labels).loss
    assert abs(loss.item() - twin_loss.item()) <= TOL
    loss.backward()
    twin_loss.backward()
    ours, theirs = grads(model), grads(twin)
    tied = model.config.tie_word_embeddings
    assert ours.keys() == theirs.keys() and len(ours) == 3 - tied + 9 * model.config.n_layers
    assert all(max_diff(ours[n], theirs[n]) <= TOL for n in ours)


def test_packed_documents(tiny_model):
    model = tiny_model("tiny-gqa")
    ids, _ = batch(B=2, T=12)
    layouts = [(4, 5, 3), (7, 5)]  # documents per row
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in docs]) for docs in layouts])
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids)
        for row, docs in enumerate(layouts):
            for start, n in zip(torch.tensor((0,) + docs).cumsum(0).tolist(), docs):
                alone = model(ids[row:row + 1, start:start + n])
                assert max_diff(packed[row, start:start + n], alone[0]) <= TOL
        # Without position_ids the row is one document: the later documents' logits change.
        assert max_diff(model(ids)[0, 4:9], packed[0, 4:9]) > 1e-3


def reference_loss(model, ids, labels, reduction):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("freeze_head", [False, True])
def test_chunked_loss_matches_full_logits(tiny_model, reduction, freeze_head):
    model = tiny_model()
    model.lm_head.chunk_size = 3  # 17 targets: 6 chunks, the last one partial
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.lm_head.weight.requires_grad_(not freeze_head)
    ids, labels = batch()
    loss, ref = model(ids, labels=labels, reduction=reduction), reference_loss(reference, ids, labels, reduction)
    assert abs(loss.item() - ref.item()) <= TOL * max(1.0, ref.item())
    (2.5 * loss).backward()  # a non-unit incoming gradient
    (2.5 * ref).backward()
    ours, theirs = grads(model), grads(reference)
    assert ours.keys() == theirs.keys() and ("lm_head.weight" in ours) != freeze_head
    assert all(max_diff(ours[n], theirs[n]) <= TOL for n in ours)
    with torch.no_grad():
        assert abs(model(ids, labels=labels, reduction=reduction).item() - ref.item()) <= TOL * max(1.0, ref.item())


@pytest.mark.parametrize("need_h,need_w", [(True, True), (True, False), (False, True), (False, False)])
def test_lm_head_gradients(need_h, need_w):
    torch.manual_seed(0)
    head = LMHead(16, 50, bias=False)
    head.chunk_size = 4
    head.weight.requires_grad_(need_w)
    h = torch.randn(11, 16, requires_grad=need_h)
    targets = torch.randint(0, 50, (11,))
    loss = head(h, targets)
    ref = F.cross_entropy(h @ head.weight.T, targets, reduction="sum")
    assert abs(loss.item() - ref.item()) <= TOL * ref.item()
    if need_h or need_w:
        inputs = [t for t, need in ((h, need_h), (head.weight, need_w)) if need]
        for g, g_ref in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
            assert max_diff(g, g_ref) <= TOL
    else:
        assert not loss.requires_grad


def test_sum_reduction_and_count_targets(tiny_model):
    model = tiny_model()
    ids, labels = batch()
    assert count_targets(labels).item() == 2 * 11 - 3 - 3 == (labels[:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        total, mean = model(ids, labels=labels, reduction="sum"), model(ids, labels=labels)
        assert abs(total.item() / count_targets(labels).item() - mean.item()) <= TOL
        empty = torch.full_like(labels, IGNORE_INDEX)
        assert model(ids, labels=empty).item() == 0.0 and count_targets(empty).item() == 0
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        model(ids, labels=labels, reduction="none")


def test_activation_checkpointing_gives_identical_gradients(tiny_model):
    model = tiny_model("tiny-gqa").train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing = True
    ids, labels = batch()
    losses = [m(ids, labels=labels) for m in (model, checkpointed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    ours, theirs = grads(model), grads(checkpointed)
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[n], theirs[n], atol=1e-7, rtol=0) for n in ours)


def test_cache_under_activation_checkpointing_and_mask_shapes(tiny_model):
    model = tiny_model("tiny-gqa").train()
    model.activation_checkpointing = True
    ids, _ = batch(T=10)
    with torch.no_grad():
        full = model(ids)
    cache = model.make_cache(2, 10)
    first = model(ids[:, :6], cache=cache)  # gradients on, training mode: the cache must still be filled
    rest = model(ids[:, 6:], cache=cache)
    assert max_diff(torch.cat([first, rest], 1), full) <= TOL
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, cached \+ T\) = \(2, 11\), got \(2, 1\)"):
        model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.arange(10)[None])
    with torch.no_grad():
        assert max_diff(model(ids, last_only=True), model(ids)[:, -1:]) <= TOL


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_cached_decoding_matches_full_forward(tiny_model, preset):
    model = tiny_model(preset)
    ids, _ = batch(T=14)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(batch_size=2, max_len=16)
        steps = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]  # prefill, then a 3-token chunk
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 14)]  # then token by token
        assert cache.length == 14
        assert max_diff(torch.cat(steps, dim=1), full) <= TOL
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(ids[:, :3], cache=cache)


def left_padded(rows: list[torch.Tensor], pad_id: int = 0):
    T = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (T - len(r), 0), value=pad_id) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (T - len(r), 0)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padded_batch(tiny_model, hf_twin, explicit_positions):
    model = tiny_model("tiny-gqa")
    ids, _ = batch(B=3, T=9, seed=1)
    rows = [ids[0, :5], ids[1], ids[2, :2]]
    padded, mask = left_padded(rows)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0) if explicit_positions else None
    with torch.no_grad():
        logits = model(padded, attention_mask=mask, position_ids=position_ids)
        assert not logits.isnan().any()
        twin = hf_twin(model)(padded, attention_mask=mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            assert max_diff(logits[i, -len(row):], alone) <= TOL
            assert max_diff(logits[i, -len(row):], twin[i, -len(row):]) <= TOL


def test_left_padded_cached_decoding(tiny_model):
    model = tiny_model("tiny-gqa")
    ids, _ = batch(B=2, T=10, seed=2)
    rows = [ids[0, :4], ids[1, :7]]
    padded, mask = left_padded(rows)
    new = ids[:, 7:10]  # three generated tokens per row
    with torch.no_grad():
        cache = model.make_cache(batch_size=2, max_len=10)
        steps = [model(padded, attention_mask=mask, cache=cache)[:, -1:]]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            steps.append(model(new[:, t:t + 1], attention_mask=mask, cache=cache))
        decoded = torch.cat(steps, dim=1)  # logits after the prompt and after each new token
        assert not decoded.isnan().any()
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, new[i]])[None])[0, len(row) - 1:]
            assert max_diff(decoded[i], alone) <= TOL
