"""Batched autoregressive generation with a KV cache: greedy, or sampling with temperature, top-k and top-p.

The model is used as it is: call `model.eval()` first (dropout-free LLaMA gives the same results either way, but
adapters with dropout do not). Prompts of different lengths are left-padded and masked, and their rotary positions
start at 0, so a prompt generates the same tokens alone or in a batch (up to floating-point rounding).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, extra: int = 0):
    """(ids (B, L), mask (B, L + extra), positions (B, L)) of token rows left-padded to the longest, L: the mask is
    0 at the padding (and 1 over `extra` positions to come), positions start at 0 at each row's first real token."""
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.ones(B, L + extra, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :L - len(r)] = 0
    positions = (mask[:, :L].cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax if temperature == 0, else a draw from the softmax of
    logits / temperature restricted to the `top_k` most likely tokens (0: all) and to the smallest set whose
    probability reaches `top_p` (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens more likely than it already reach top_p (the most likely one always stays).
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
def stream_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, eos_id: int | Sequence[int] | None = 2, pad_id: int = 0,
                    stop: Sequence[str] | None = None, generator: torch.Generator | None = None,
                    tokenizer=None, finish_reasons: list[str] | None = None) -> Iterator[list[list[int]]]:
    """Yield, at each decoding step, the tokens of each row that became final at that step (often none or one).

    The concatenation of a row's yields is what `generate` returns for it. A row ends at `eos_id` (one id, or several:
    EOS and the end-of-turn tokens, as `tokenizer.stop_ids`; not returned), at
    the first occurrence of a `stop` string in its decoded continuation (`tokenizer` required), after
    `max_new_tokens`, or when prompt + new tokens reach `model.config.max_seq_len`. With stop strings, tokens are held
    back while the text ends with the start of a stop string or an incomplete UTF-8 character, and a row that stops
    returns the longest run of tokens whose text is a prefix of the text before the stop string: that text exactly,
    unless the stop string starts inside a token, which is then dropped too. `finish_reasons`, if given, is filled
    with each row's reason: "eos", "stop" or "length".
    """
    stop = [s for s in (stop or []) if s]
    stop_ids = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    reasons = finish_reasons if finish_reasons is not None else []
    reasons[:] = ["length"] * len(prompts)
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated tokens")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token (e.g. bos)")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid generation settings: max_new_tokens={max_new_tokens} (>= 0), temperature="
                         f"{temperature} (>= 0), top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
    B, lengths, limit = len(prompts), [len(p) for p in prompts], model.config.max_seq_len
    L = max(lengths)
    if L > limit:
        raise ValueError(f"a prompt has {L} tokens, more than the model's max_seq_len of {limit}")
    steps = min(max_new_tokens, limit - L)
    if steps == 0:
        return
    device = next(model.parameters()).device
    tokens, mask, positions = left_pad(prompts, pad_id, extra=steps)  # mask over prompt and new tokens
    tokens, mask, positions = tokens.to(device), mask.to(device), positions.to(device)
    cache = model.make_cache(B, L + steps - 1)  # the last token is never fed back
    padded = min(lengths) < L  # without padding no mask is needed: plain causal attention
    logits = model(tokens, position_ids=positions, attention_mask=mask[:, :L] if padded else None, cache=cache,
                   last_only=True)[:, -1]
    new: list[list[int]] = [[] for _ in range(B)]
    released, done = [0] * B, [False] * B
    for step in range(steps):
        next_tokens = sample(logits, temperature, top_k, top_p, generator)
        out: list[list[int]] = [[] for _ in range(B)]
        for i, t in enumerate(next_tokens.tolist()):
            if done[i]:
                continue
            if t in stop_ids:
                done[i], reasons[i] = True, "eos"
            else:
                new[i].append(t)
            end = len(new[i])
            if stop and not done[i]:
                scan = scan_for_stop(tokenizer, new[i], stop)
                end = scan.safe_tokens
                if scan.stopped:  # keep what precedes the stop string
                    done[i], reasons[i] = True, "stop"
            out[i], released[i] = new[i][released[i]:end], max(released[i], end)
        if step == steps - 1 or all(done):
            # Rows cut short by the length limit release what they held back.
            yield [o + ([] if done[i] else new[i][released[i]:]) for i, o in enumerate(out)]
            return
        yield out
        logits = model(next_tokens[:, None], position_ids=positions[:, -1:] + step + 1,
                       attention_mask=mask[:, :L + step + 1] if padded else None, cache=cache)[:, -1]


@dataclass
class StopScan:
    stopped: bool  # the text contains a stop string
    safe_tokens: int  # stopped: the tokens before it; else the leading tokens that can no longer be part of one


def scan_for_stop(tokenizer, tokens: list[int], stop: list[str]) -> StopScan:
    """Where a row's generated tokens stand against the stop strings."""
    text = tokenizer.decode(tokens, continuation=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        safe = min(hits)
    else:  # hold back a tail that may be the start of a stop string, or a character still missing bytes
        safe = len(text.rstrip("\ufffd"))
        held = max((k for s in stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        safe -= held
    n = len(tokens)
    while n and not text[:safe].startswith(tokenizer.decode(tokens[:n], continuation=True)):
        n -= 1
    return StopScan(bool(hits), n)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | Sequence[int] | None = 2, pad_id: int = 0,
             stop: Sequence[str] | None = None, generator: torch.Generator | None = None,
             tokenizer=None, finish_reasons: list[str] | None = None) -> list[list[int]]:
    """The new tokens of each prompt, without eos and stop strings: see `stream_generate`."""
    result: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, eos_id=eos_id, pad_id=pad_id, stop=stop,
                                generator=generator, tokenizer=tokenizer, finish_reasons=finish_reasons):
        for row, toks in zip(result, step):
            row.extend(toks)
    return result
