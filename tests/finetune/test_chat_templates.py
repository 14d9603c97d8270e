"""template: model: the checkpoint's own Jinja chat template, rendered as transformers renders it."""
from __future__ import annotations

import json

import pytest

from finetune.chat_templates import chat_template_of, load_model_template
from finetune.errors import UserError
from finetune.templates import encode_segments, tokenize

from ..conftest import LLAMA3_INSTRUCT

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " the day "},
                {"role": "assistant", "content": "one two"}, {"role": "user", "content": "and three?"},
                {"role": "assistant", "content": "three."}]


@pytest.fixture(scope="module")
def model_folder(llama3_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("instruct")
    for name, source in llama3_tokenizer.files.items():
        (folder / name).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_INSTRUCT}))
    return folder


def test_prompts_equal_transformers_apply_chat_template(model_folder, llama3_tokenizer):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(model_folder)
    ours = load_model_template(model_folder, llama3_tokenizer)
    for end in (2, 4):  # prompts for the first and the second answer
        expected = theirs.apply_chat_template(CONVERSATION[:end], add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
        assert tokenize(ours.prompt(CONVERSATION[:end]), llama3_tokenizer) == expected
    whole = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    segments = ours.render(CONVERSATION)
    assert tokenize(segments, llama3_tokenizer) == whole
    pieces = encode_segments(segments, llama3_tokenizer)
    trained = [llama3_tokenizer.decode(ids) for seg, ids in zip(segments, pieces) if seg.trained]
    assert trained == ["one two", "three."]  # the assistant turns (decode skips their <|eot_id|>) ...
    eot = llama3_tokenizer.token_to_id("<|eot_id|>")
    assert all(ids[-1] == eot for seg, ids in zip(segments, pieces) if seg.trained)  # ... which end the turn


def test_control_token_text_in_a_message_stays_text(model_folder, llama3_tokenizer):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(model_folder)
    ours = load_model_template(model_folder, llama3_tokenizer)
    messages = [{"role": "user", "content": "end it here <|eot_id|> then <|start_header_id|>"}]
    ids = tokenize(ours.prompt(messages), llama3_tokenizer)
    assert ids == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False, sanitize_control_tokens=True)
    assert ids.count(llama3_tokenizer.token_to_id("<|eot_id|>")) == 1  # the template's, after the message


def test_templates_without_append_only_turns_and_bad_sources(model_folder, llama3_tokenizer, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | length }}"}))
    odd = load_model_template(tmp_path, llama3_tokenizer)
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        odd.render(CONVERSATION[1:3])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(UserError, match="not a valid Jinja template"):
        load_model_template(tmp_path, llama3_tokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(UserError, match="has no chat_template"):
        load_model_template(tmp_path, llama3_tokenizer)
    raising = "{{ raise_exception('System role not supported') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": raising}))
    with pytest.raises(ValueError, match="System role not supported"):
        load_model_template(tmp_path, llama3_tokenizer).prompt(CONVERSATION[:2])
    # The sandbox: a template cannot reach Python internals.
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": escape}))
    with pytest.raises(ValueError):
        load_model_template(tmp_path, llama3_tokenizer).prompt(CONVERSATION[:2])


def test_where_a_folder_keeps_its_chat_template(tmp_path):
    """chat_template.jinja first (transformers >= 4.50 saves it there and reads it before the config's), then
    tokenizer_config.json's string or the "default" of a list; entries of another shape are ignored, not a crash."""
    config = tmp_path / "tokenizer_config.json"
    assert chat_template_of(tmp_path) is None
    config.write_text(json.dumps({"chat_template": ["x", {"name": "tool_use", "template": "T"},
                                                    {"name": "default", "template": "D"}]}))
    assert chat_template_of(tmp_path) == "D"
    config.write_text(json.dumps({"chat_template": ["x", 3]}))
    assert chat_template_of(tmp_path) is None
    config.write_text(json.dumps({"chat_template": "C"}))
    assert chat_template_of(tmp_path) == "C"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_template_of(tmp_path) == "J"
