from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from llama_core.generate import generate, sample, stream_generate

PROMPTS = [[1, 5, 9, 33, 100, 7, 8], [1, 42, 17]]  # different lengths: the second is left-padded in a batch


class Scripted(torch.nn.Module):
    """A stand-in model whose row i emits scripts[i][k] as its k-th new token; it records what it is fed."""

    def __init__(self, scripts, vocab_size=320, max_seq_len=64):
        super().__init__()
        self.scripts, self.vocab_size = scripts, vocab_size
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def make_cache(self, batch_size, max_len):
        return SimpleNamespace(max_len=max_len)

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, last_only=False):
        k = len(self.calls)
        self.calls.append((input_ids, position_ids, attention_mask))
        logits = torch.zeros(input_ids.shape[0], 1 if last_only else input_ids.shape[1], self.vocab_size)
        for i, script in enumerate(self.scripts):
            logits[i, -1, script[k] if k < len(script) else 0] = 1.0
        return logits


def hf_greedy(twin, prompts, max_new_tokens, eos_id):
    """transformers' greedy generation (left-padded if batched), cut at eos."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
    out = twin.generate(ids, attention_mask=mask, generation_config=config)[:, L:].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_greedy_matches_transformers(tiny_model, hf_twin, preset):
    model = tiny_model(preset)
    twin = hf_twin(model)
    free = generate(model, PROMPTS, max_new_tokens=12, eos_id=None)
    eos = free[0][6]  # a token the first row produces: it must stop there, the second row need not
    ours = generate(model, PROMPTS, max_new_tokens=12, eos_id=eos)
    assert ours[0] == free[0][:free[0].index(eos)]
    assert ours == [generate(model, [p], max_new_tokens=12, eos_id=eos)[0] for p in PROMPTS]  # batched == alone
    assert ours == [hf_greedy(twin, [p], 12, eos)[0] for p in PROMPTS]


def test_cache_matches_recomputation(tiny_model):
    model = tiny_model()
    for prompt, new in zip(PROMPTS, generate(model, PROMPTS, max_new_tokens=10, eos_id=None)):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
        assert new == seq[len(prompt):]


def test_sampling(tiny_model):
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=8, eos_id=None)

    def run(seed, **kw):
        return generate(model, PROMPTS, max_new_tokens=8, eos_id=None, generator=torch.Generator().manual_seed(seed),
                        **kw)

    kw = dict(temperature=0.8, top_k=50, top_p=0.9)
    assert run(0, **kw) == run(0, **kw) != run(1, **kw)
    assert run(0, temperature=1.0) != greedy
    assert run(0, temperature=1.0, top_k=1) == greedy == run(1, temperature=5.0, top_p=1e-6)


def test_sample_filters():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(2000, 1)

    def drawn(**kw):
        return set(sample(logits, generator=torch.Generator().manual_seed(0), **kw).tolist())

    assert drawn() == {0} and drawn(temperature=1.0) == {0, 1, 2, 3}
    assert drawn(temperature=1.0, top_k=2) == {0, 1} and drawn(temperature=1.0, top_k=1) == {0}
    assert drawn(temperature=1.0, top_p=0.75) == {0, 1} and drawn(temperature=1.0, top_p=0.85) == {0, 1, 2}
    assert drawn(temperature=1.0, top_p=0.85, top_k=2) == {0, 1}
    assert sample(logits[:3]).tolist() == [0, 0, 0]


def test_padding_positions_and_eos():
    model = Scripted([[5, 6, 2, 7], [8, 9, 10, 11]])
    assert generate(model, PROMPTS, max_new_tokens=4) == [[5, 6], [8, 9, 10, 11]]
    ids, positions, mask = model.calls[0]
    assert ids[1].tolist() == [0, 0, 0, 0, 1, 42, 17] and mask[1].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert positions.tolist() == [list(range(7)), [0, 0, 0, 0, 0, 1, 2]]
    ids, positions, mask = model.calls[2]  # the second decoding step
    assert ids.tolist() == [[6], [9]] and positions.tolist() == [[8], [4]] and mask.shape == (2, 9)
    assert mask[1].tolist() == [0, 0, 0, 0] + [1] * 5
    assert len(model.calls) == 4  # the last token is not fed back


@pytest.mark.parametrize("text, stop, kept", [
    (" the model. It was good", ["."], " the model"),
    (" the model. It was good", [" It"], " the model."),
    (" the model. It was good", ["he m"], " t"),
    (" the model. It was good", ["good", "was"], " the model. It"),  # "was" starts inside "▁w": that token goes
    (" the model. It was good", ["x", "It was good"], " the model. "),
    (" the model. It was good", ["goods", "wax"], " the model. It was good"),  # prefixes held back, then released
    (" on the day", ["n t"], ""),
    (" a 🙂 b", ["🙂"], " a "),
    (" a 🙂 b", ["\U0001F642x"], " a 🙂 b"),
])
def test_stop_strings(tokenizer, text, stop, kept):
    script = tokenizer.encode(text, continuation=True)
    make = lambda: Scripted([script, script[:3]])  # noqa: E731
    out = generate(make(), [[1], [1, 5]], max_new_tokens=len(script), stop=stop, tokenizer=tokenizer)
    assert out[0] == script[:len(out[0])] and tokenizer.decode(out[0], continuation=True) == kept
    steps = list(stream_generate(make(), [[1], [1, 5]], max_new_tokens=len(script), stop=stop, tokenizer=tokenizer))
    assert [sum((s[0] for s in steps), [])] == [out[0]]
    # Nothing is released before it is known not to start a stop string.
    text_so_far = ""
    for step in steps:
        text_so_far += tokenizer.decode(step[0], continuation=True)
        assert not any(s in text_so_far for s in stop)


def test_stop_stream_holds_back(tokenizer):
    script = tokenizer.encode(" the model. It was good", continuation=True)
    pieces = ["▁t", "h", "e", "▁", "m", "o", "d", "e", "l", ".", "▁", "I", "t"]
    assert [tokenizer.id_to_piece(t) for t in script[:13]] == pieces
    steps = list(stream_generate(Scripted([script]), [[1]], max_new_tokens=30, stop=[" It"], tokenizer=tokenizer))
    # "▁" could start " It": it waits for "m"; the final "▁", "I" wait, and "t" completes the stop string.
    s = script
    assert [x[0] for x in steps] == [[s[0]], [s[1]], [s[2]], [], [s[3], s[4]], *[[t] for t in s[5:10]], [], [], []]


def test_max_seq_len(tiny_model):
    model = tiny_model(max_seq_len=16)
    out = generate(model, [[1] * 13, [1, 2]], max_new_tokens=10, eos_id=None)
    assert [len(o) for o in out] == [3, 3]  # the longest prompt plus its new tokens fill max_seq_len
    assert generate(model, [[1] * 16], max_new_tokens=10) == [[]]
    with pytest.raises(ValueError, match="17 tokens, more than the model's max_seq_len of 16"):
        generate(model, [[1] * 17], max_new_tokens=1)
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], []]


def test_invalid_arguments(tiny_model):
    model = tiny_model()
    for kwargs in [dict(prompts=[]), dict(prompts=[[1], []]), dict(stop=["x"]), dict(top_p=0.0),
                   dict(temperature=-1.0), dict(max_new_tokens=-1)]:
        with pytest.raises(ValueError):
            generate(model, **{"prompts": PROMPTS, "max_new_tokens": 2, **kwargs})


def test_several_stop_ids(tiny_model):
    """A row ends at any of the ids (EOS and end-of-turn tokens such as Llama 3's <|eot_id|>), not returned."""
    model = tiny_model()
    prompt = [[1, 5, 9, 17]]
    free = generate(model, prompt, max_new_tokens=8, eos_id=None)[0]
    reasons = []
    cut = generate(model, prompt, max_new_tokens=8, eos_id=[999, free[3]], finish_reasons=reasons)[0]
    assert cut == free[:free.index(free[3])] and reasons == ["eos"]
