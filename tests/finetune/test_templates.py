"""Prompt templates: exact texts, segments and masks, prompt/training agreement, Jinja export, user YAML files."""
from __future__ import annotations

from pathlib import Path

import jinja2.sandbox
import pytest

from finetune.errors import UserError
from finetune.templates import (BUILTINS, Segment, Template, encode_segments, format_choices, load_template,
                                segments_text, tokenize)

ROOT = Path(__file__).resolve().parents[2]
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

TWO_TURNS = [{"role": "system", "content": "Be {brief}."},
             {"role": "user", "content": "Add 2 and 3.", "input": ""},
             {"role": "assistant", "content": "5"},
             {"role": "user", "content": "Now double it."},
             {"role": "assistant", "content": "10"}]


def alpaca(instruction, input, output):
    return [{"role": "user", "content": instruction, "input": input}, {"role": "assistant", "content": output}]


def test_alpaca_prompts_are_stanfords_exactly():
    t = load_template("alpaca")
    with_input = t.render(alpaca("Sum the numbers.", "2, 3", "5"))
    assert with_input == [Segment(ALPACA_INPUT.format(instruction="Sum the numbers.", input="2, 3"), False, bos=True),
                          Segment("5", True, eos=True)]
    without = t.prompt(alpaca("Name a color.", "", "Red")[:1])
    assert without == [Segment(ALPACA_NO_INPUT.format(instruction="Name a color."), False, bos=True)]


@pytest.mark.parametrize("name, expected", [
    ("vicuna", "<s>Be {brief}. USER: Add 2 and 3. ASSISTANT: 5</s>USER: Now double it. ASSISTANT: 10</s>"),
    ("llama2-chat", "<s>[INST] <<SYS>>\nBe {brief}.\n<</SYS>>\n\nAdd 2 and 3. [/INST] 5 </s>"
                    "<s>[INST] Now double it. [/INST] 10 </s>"),
    ("chatml", "<s><|im_start|>system\nBe {brief}.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
               "<|im_start|>assistant\n5<|im_end|></s>\n<|im_start|>user\nNow double it.<|im_end|>\n"
               "<|im_start|>assistant\n10<|im_end|></s>"),
    ("plain", "<s>Be {brief}.\nAdd 2 and 3.5</s>Now double it.10</s>"),
    ("mmlu", "<s>Be {brief}.\n\nAdd 2 and 3.\nAnswer: 5\n\nNow double it.\nAnswer: 10"),
])
def test_builtin_snapshots(name, expected):
    segments = load_template(name).render(TWO_TURNS)
    assert segments_text(segments) == expected
    assert [s.text for s in segments if s.trained] == {
        "vicuna": [" 5", " 10"], "llama2-chat": [" 5 ", " 10 "], "chatml": ["5<|im_end|>", "10<|im_end|>"],
        "plain": ["5", "10"], "mmlu": [" 5", " 10"]}[name]


def test_vicuna_default_system_and_prompt_end():
    t = load_template("vicuna")
    assert segments_text(t.prompt(TWO_TURNS[1:2])) == f"<s>{VICUNA_SYSTEM} USER: Add 2 and 3. ASSISTANT:"


def test_mmlu_question_format():
    t = load_template("mmlu")
    q = [{"role": "user", "content": "What is 2 + 2?", "input": format_choices(["3", "4", "5", "6"])}]
    assert segments_text(t.prompt(q), bos="") == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert t.render(q + [{"role": "assistant", "content": "B"}])[-1] == Segment(" B", True)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_prompt_tokens_are_a_prefix_of_training_tokens(name, tokenizer):
    t = load_template(name)
    conv = TWO_TURNS if t.system is not None else TWO_TURNS[1:]
    ids = tokenize(t.render(conv), tokenizer)
    for k in (len(conv) - 1, len(conv) - 3):  # prompts before the last and the first answer
        prompt = tokenize(t.prompt(conv[:k]), tokenizer)
        assert ids[:len(prompt)] == prompt and len(prompt) < len(ids)
    if not t.bos_each_turn:  # continuations add no dummy-prefix space: the ids decode to the text
        assert tokenizer.decode(ids) == segments_text(t.render(conv), bos="", eos="")


@pytest.mark.parametrize("name", ["alpaca", "vicuna", "chatml", "plain"])
def test_bos_once_and_eos_after_every_answer(name, tokenizer):
    t = load_template(name)
    conv = TWO_TURNS if t.system is not None else TWO_TURNS[1:]
    pieces = encode_segments(t.render(conv), tokenizer)
    ids = [i for p in pieces for i in p]
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert ids.count(tokenizer.eos_id) == 2 and ids[-1] == tokenizer.eos_id
    trained = [i for seg, p in zip(t.render(conv), pieces) if seg.trained for i in p]
    assert trained.count(tokenizer.eos_id) == 2  # each answer's EOS is trained


def test_llama2_turns_are_bos_sequences(tokenizer):
    pieces = encode_segments(load_template("llama2-chat").render(TWO_TURNS), tokenizer)
    ids = [i for p in pieces for i in p]
    assert ids.count(tokenizer.bos_id) == 2 and ids.count(tokenizer.eos_id) == 2
    second = pieces[2]  # "<s>[INST] Now double it. [/INST]" starts a new sequence: dummy-prefix encoding
    assert second == [tokenizer.bos_id] + tokenizer.encode("[INST] Now double it. [/INST]")


def test_literal_special_text_is_not_a_special_token(tokenizer):
    conv = alpaca("Print </s> and <s>.", "", "</s>")
    ids = tokenize(load_template("alpaca").render(conv), tokenizer)
    assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eos_id) == 1


def test_conversation_errors():
    with pytest.raises(ValueError, match="no system prompt"):
        load_template("alpaca").render(TWO_TURNS)
    with pytest.raises(ValueError, match="alternate"):
        load_template("vicuna").render([TWO_TURNS[1], TWO_TURNS[3], TWO_TURNS[4]])
    with pytest.raises(ValueError, match="end with an assistant"):
        load_template("vicuna").render(TWO_TURNS[:2])
    with pytest.raises(ValueError, match="end with a user"):
        load_template("vicuna").prompt(TWO_TURNS[:3])


@pytest.mark.parametrize("name", list(BUILTINS))
def test_to_jinja_renders_the_same_text(name):
    t = load_template(name)
    # transformers renders chat templates in this environment
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja = env.from_string(t.to_jinja())
    convs = [TWO_TURNS[1:], [TWO_TURNS[1] | {"input": "x\ny"}, *TWO_TURNS[2:]]]
    if t.system is not None:
        convs.append(TWO_TURNS)
    for conv in convs:
        kw = dict(bos_token="<s>", eos_token="</s>")
        assert jinja.render(messages=conv, add_generation_prompt=False, **kw) == segments_text(t.render(conv))
        assert jinja.render(messages=conv[:-1], add_generation_prompt=True, **kw) == segments_text(
            t.prompt(conv[:-1]))


def test_user_template_file(tmp_path):
    t = load_template(str(ROOT / "recipes" / "templates" / "example_user_template.yaml"))
    conv = alpaca("Why?", "ctx", "Because.")
    assert segments_text(t.render(conv)) == "<s>Context: ctx\n\nQuestion: Why?\nAnswer: Because.</s>"
    assert t.render(conv)[-1] == Segment(" Because.", True, eos=True)
    path = tmp_path / "t.yaml"
    path.write_text('name: mine\nuser: "Q: {content}\\n"\nassistant: "A: {content}"\n')
    mine = load_template(str(path))
    assert segments_text(mine.prompt(conv[:1])) == "<s>Q: Why?\n\nctx\nA:"
    assert mine.sha256 != t.sha256


@pytest.mark.parametrize("text, message", [
    ("name: x\nuser: '{content}'\nassistant: '{content}'\ncolour: red\n", "unknown key 'colour'"),
    ("name: x\nuser: 'no placeholder'\nassistant: '{content}'\n", "'user' must contain {content}"),
    ("name: x\nuser: '{content}'\n", "missing key 'assistant'"),
    ("name: x\nuser: '{content}'\nassistant: '{content}</s>'\n", "must not contain <s> or </s>"),
    ("name: x\nuser: '{content}'\nassistant: '{content}'\neos: 3\n", "'eos' must be a bool"),
    ("- a list\n", "must be a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_user_template_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_template(str(path))
    assert str(path) in str(e.value)


def test_unknown_template_lists_the_builtins(tmp_path):
    with pytest.raises(UserError, match="alpaca, vicuna, llama2-chat, llama3, chatml, plain, mmlu"):
        load_template("alpacca")
    with pytest.raises(UserError, match="missing.yaml"):
        load_template(str(tmp_path / "missing.yaml"))


def test_fingerprint_follows_the_definition():
    a = load_template("alpaca")
    assert a.sha256 == load_template("alpaca").sha256
    assert a.sha256 == Template({**a.definition, "name": "renamed"}).sha256  # the name does not render
    assert a.sha256 != Template({**a.definition, "separator": "\n"}).sha256
    assert len({load_template(n).sha256 for n in BUILTINS}) == len(BUILTINS)


# --- control tokens as single ids (Llama 3, ChatML) ---------------------------------------------------------------

def test_llama3_template_uses_control_ids_and_never_from_user_text(llama3_tokenizer, tokenizer):
    t, tok = load_template("llama3"), llama3_tokenizer
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say <|eot_id|> please"}, {"role": "assistant", "content": "Done."}]
    segments = t.render(conversation)
    assert segments_text(segments, bos="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSay <|eot_id|> please<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nDone.<|eot_id|>")
    ids = tokenize(segments, tok)
    eot, header = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|start_header_id|>")
    assert ids[0] == tok.bos_id and ids.count(header) == 3
    assert ids.count(eot) == 3  # the template's three, not the user's: that one is text
    assert tok.encode("Say <|eot_id|> please") == tokenize(
        [Segment("Say <|eot_id|> please", False, data=((0, 20),))], tok)
    trained = [s for s in segments if s.trained]
    assert [s.text for s in trained] == ["Done.<|eot_id|>"] and not trained[0].eos  # the turn ends with <|eot_id|>
    prompt = tokenize(t.prompt(conversation[:2]), tok)
    assert ids[:len(prompt)] == prompt and tok.decode(ids[len(prompt):]) == "Done."
    with pytest.raises(UserError, match="template 'llama3' needs the special token.*<\\|eot_id\\|>"):
        t.check_tokenizer(tokenizer)  # a SentencePiece vocabulary has no such tokens
    t.check_tokenizer(tok)


def test_chatml_control_tokens_are_ids_where_the_tokenizer_has_them(llama3_tokenizer, tokenizer, tmp_path):
    t = load_template("chatml")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    t.check_tokenizer(tokenizer)  # optional: text for a tokenizer without them
    assert tokenize(t.render(conversation), tokenizer) == [tokenizer.bos_id] + tokenizer.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>") + [tokenizer.eos_id]
    ids = tokenize(t.render(conversation), llama3_tokenizer)
    assert not any(llama3_tokenizer.special_tokens.get(x) in ids for x in ("<|im_start|>", "<|im_end|>"))
