import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from engine.tokenizer import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    load_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# fmt: off
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "llama", "alpaca", "memory", "chunk",
    "prefill", "cache", "token", "Café", "naïve", "東京", "Ελλάδα", "emoji", "😀", "🚀", "digits",
    "0123456789", "code", "def", "return", "(x)", "[y]", "{z}", "<tag>", "&", "more",
]
# fmt: on
LINES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)) for i in range(300)]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def write_config(directory: Path, **config) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def train_byte_level_bpe(path: Path, *, bos: str | None = None) -> None:
    """A tiny byte-level BPE tokenizer.json; ``bos`` makes its post-processor prepend that token."""
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(LINES, trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    tokenizer.save(str(path))


def train_sentencepiece(directory: Path) -> None:
    """A tiny Llama-style SentencePiece model: <unk> 0, <s> 1, </s> 2, byte fallback."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES),
        model_prefix=str(directory / "sp"),
        vocab_size=360,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "sp.model").rename(directory / "tokenizer.model")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    train_byte_level_bpe(directory / "tokenizer.json")
    write_config(directory, bos_token="<|im_start|>", eos_token={"content": "<|im_end|>"})
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sp")
    train_sentencepiece(directory)
    return directory


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> Tokenizer:
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def sp(sp_dir) -> Tokenizer:
    return load_tokenizer(sp_dir)


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


# --- tokenizer.json -----------------------------------------------------------------------------


def test_tokenizer_json_round_trips_text(bpe):
    for text in [*LINES[:20], "  leading spaces", "new\nlines\n", "Café 😀 東京"]:
        assert bpe.decode(bpe.encode(text)) == text


def test_tokenizer_json_reads_special_tokens_from_config(bpe):
    assert bpe.bos_id == bpe.id_of("<|im_start|>") == 1
    assert bpe.eos_id == bpe.id_of("<|im_end|>") == 2  # given as {"content": ...}
    assert bpe.id_of("no such token") is None
    assert bpe.vocab_size == 400
    ids = bpe.encode("a<|im_end|>b")
    assert 2 in ids
    assert bpe.decode(ids) == "ab"
    assert bpe.decode(ids, skip_special=False) == "a<|im_end|>b"


def test_tokenizer_json_adds_nothing_unless_its_post_processor_does(bpe):
    assert bpe.encode("hello", add_special=False) == bpe.encode("hello")


def test_post_processor_bos_is_added_once_and_config_can_turn_it_off(tmp_path):
    train_byte_level_bpe(tmp_path / "tokenizer.json", bos="<|endoftext|>")
    write_config(tmp_path, bos_token="<|endoftext|>")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("hello") == [0, *tokenizer.encode("hello", add_special=False)]
    assert tokenizer.encode("hello").count(0) == 1
    write_config(tmp_path, bos_token="<|endoftext|>", add_bos_token=False)
    assert load_tokenizer(tmp_path).encode("hello")[0] != 0


def test_config_can_ask_for_bos_and_eos(bpe_dir, tmp_path):
    directory = copy_of(bpe_dir, tmp_path)
    write_config(
        directory, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=True, add_eos_token=True
    )
    tokenizer = load_tokenizer(directory)
    body = tokenizer.encode("hi", add_special=False)
    assert tokenizer.encode("hi") == [1, *body, 2]


def test_unknown_special_token_in_config_is_a_clear_error(bpe_dir, tmp_path):
    directory = copy_of(bpe_dir, tmp_path)
    write_config(directory, bos_token="<BOS>")
    with pytest.raises(TokenizerError, match="'<BOS>'"):
        load_tokenizer(directory)


# --- tokenizer.model ----------------------------------------------------------------------------


def test_sentencepiece_adds_bos_like_llama(sp):
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    ids = sp.encode("the quick brown fox")
    assert ids[0] == 1 and ids.count(1) == 1
    assert sp.encode("the quick brown fox", add_special=False) == ids[1:]
    assert sp.decode(ids) == "the quick brown fox"


def test_sentencepiece_reads_control_token_text_as_the_token(sp):
    ids = sp.encode("<s>llama</s>", add_special=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert sp.decode(ids) == "llama"
    assert sp.decode(ids, skip_special=False) == "<s>llama</s>"


def test_sentencepiece_handles_unseen_characters_by_bytes(sp):
    text = "ünseen ☃ characters"
    assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_id_of(sp):
    assert sp.id_of("<s>") == 1
    assert sp.id_of("<unk>") == 0
    assert sp.id_of("definitely-not-a-piece") is None


def test_config_can_turn_off_sentencepiece_bos(sp_dir, tmp_path):
    directory = copy_of(sp_dir, tmp_path)
    write_config(directory, add_bos_token=False)
    assert load_tokenizer(directory).encode("llama")[0] != 1


# --- which file -------------------------------------------------------------------------------


def test_tokenizer_json_is_preferred_over_tokenizer_model(sp_dir, bpe_dir, tmp_path):
    directory = copy_of(sp_dir, tmp_path)
    shutil.copy(bpe_dir / "tokenizer.json", directory / "tokenizer.json")
    assert load_tokenizer(directory).vocab_size == 400  # the BPE's, not the SentencePiece's 360
    (directory / "tokenizer.json").unlink()
    assert load_tokenizer(directory).vocab_size == 360


def test_a_directory_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"neither tokenizer\.json nor tokenizer\.model"):
        load_tokenizer(tmp_path)


def test_a_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        load_tokenizer(tmp_path)


# --- chat templates -----------------------------------------------------------------------------


def with_template(tokenizer_dir: Path, tmp_path: Path, template, **extra) -> Tokenizer:
    directory = copy_of(tokenizer_dir, tmp_path)
    write_config(directory, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template, **extra)
    return load_tokenizer(directory)


def test_chatml_is_the_fallback_template(bpe_dir, tmp_path):
    directory = copy_of(bpe_dir, tmp_path)
    write_config(directory, eos_token="<|im_end|>")
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.render_chat(CHAT) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.render_chat(CHAT, add_generation_prompt=False).endswith("Hello!<|im_end|>\n")


def test_template_sees_special_tokens_and_trims_blocks(bpe_dir, tmp_path):
    template = "{% for m in messages %}\n{{ bos_token }}{{ m['content'] }}{{ eos_token }}\n  {% endfor %}\n"
    tokenizer = with_template(bpe_dir, tmp_path, template)
    assert tokenizer.render_chat(CHAT) == "<|im_start|>Hi there<|im_end|>\n<|im_start|>Hello!<|im_end|>\n"


def test_list_of_templates_uses_the_default_one(bpe_dir, tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    assert with_template(bpe_dir, tmp_path, templates).render_chat(CHAT) == "DEFAULT"


def test_list_of_templates_without_default_is_a_clear_error(bpe_dir, tmp_path):
    with pytest.raises(TokenizerError, match="none named 'default'"):
        with_template(bpe_dir, tmp_path, [{"name": "rag", "template": "RAG"}])


def test_chat_template_jinja_file_and_explicit_override(bpe_dir, tmp_path):
    directory = copy_of(bpe_dir, tmp_path)
    (directory / "chat_template.jinja").write_text("FROM FILE")
    assert load_tokenizer(directory).render_chat(CHAT) == "FROM FILE"
    assert load_tokenizer(directory, chat_template="EXPLICIT").render_chat(CHAT) == "EXPLICIT"
    write_config(directory, chat_template="FROM CONFIG")
    assert load_tokenizer(directory).render_chat(CHAT) == "FROM CONFIG"
    assert load_tokenizer(directory, chat_template="EXPLICIT").render_chat(CHAT) == "EXPLICIT"


@pytest.mark.parametrize(
    "escape",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set _ = messages.append({'role': 'x'}) %}",
    ],
)
def test_sandbox_blocks_escapes_with_a_clear_error(bpe_dir, tmp_path, escape):
    tokenizer = with_template(bpe_dir, tmp_path, escape)
    with pytest.raises(ChatTemplateError, match="chat template failed: SecurityError"):
        tokenizer.render_chat(CHAT)


def test_raise_exception_carries_the_template_message(bpe_dir, tmp_path):
    template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('a system message comes first') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="rejected the conversation: a system message comes first"):
        with_template(bpe_dir, tmp_path, template).render_chat(CHAT)


def test_syntax_error_is_a_clear_error(bpe_dir, tmp_path):
    with pytest.raises(ChatTemplateError, match="syntax error on line 1"):
        with_template(bpe_dir, tmp_path, "{% for m in messages %}").render_chat(CHAT)


def test_strftime_now_and_loop_controls(bpe_dir, tmp_path):
    template = (
        "{{ strftime_now('%Y') }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}!{% endfor %}"
    )
    rendered = with_template(bpe_dir, tmp_path, template).render_chat(CHAT)
    assert rendered in {f"{datetime.now().year}!", f"{datetime.now().year - 1}!"}  # a new year may begin


def test_tojson_does_not_escape_html_and_supports_indent(bpe_dir, tmp_path):
    tokenizer = with_template(
        bpe_dir, tmp_path, "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}"
    )
    message = {"role": "user", "content": "<a href='x'>Tom & Jerry</a> é"}
    compact, indented = tokenizer.render_chat([message]).split("|")
    assert json.loads(compact) == message
    assert "<a href='x'>Tom & Jerry</a> é" in compact
    assert indented.startswith('{\n  "role": "user"')


# --- BOS in chats -------------------------------------------------------------------------------


def test_no_double_bos_when_the_template_writes_it(sp_dir, tmp_path):
    directory = copy_of(sp_dir, tmp_path)
    write_config(directory, bos_token="<s>", eos_token="</s>", chat_template=LLAMA2_TEMPLATE)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.render_chat(CHAT).startswith("<s>[INST] Hi there [/INST] Hello!</s>")
    ids = tokenizer.encode_chat(CHAT)
    assert ids[0] == 1 and ids[1] != 1 and ids.count(1) == 1
    assert ids.count(2) == 1  # the template's </s> after the assistant turn, none appended


def test_bos_is_added_once_when_the_template_does_not_write_it(sp):
    ids = sp.encode_chat(CHAT)  # ChatML fallback: no BOS text in the rendered chat
    assert ids[0] == 1 and ids.count(1) == 1


def test_no_bos_in_chats_when_the_tokenizer_adds_none(bpe):
    assert bpe.encode_chat(CHAT) == bpe.encode(bpe.render_chat(CHAT), add_special=False)


# --- streaming decode ---------------------------------------------------------------------------


def streamed(tokenizer: Tokenizer, ids: list[int], skip_special: bool) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special=skip_special)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip_special=st.booleans())
def test_streamed_pieces_concatenate_to_decode(bpe, sp, data, skip_special):
    for tokenizer in (bpe, sp):
        ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=24))
        pieces = streamed(tokenizer, ids, skip_special)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special=skip_special)


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_streaming_never_splits_a_character(request, which):
    tokenizer = request.getfixturevalue(which)
    text = "a 🚀 b ☃ c 東京"
    ids = tokenizer.encode(text, add_special=False)
    pieces = streamed(tokenizer, ids, skip_special=True)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    assert sum(1 for piece in pieces if piece) > 3  # the text arrives as it is generated
    assert pieces[-1] == ""  # every character was complete before the flush


def test_streaming_keeps_sentencepiece_spaces(sp):
    ids = sp.encode("the quick brown fox", add_special=False)
    assert "".join(streamed(sp, ids, skip_special=True)) == "the quick brown fox"


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_lone_surrogate_is_refused_clearly(request, which):
    tokenizer = request.getfixturevalue(which)
    with pytest.raises(TokenizerError, match=r"'\\ud800' at position 5, a lone surrogate"):
        tokenizer.encode("hello\ud800world")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tokenizer.encode_chat([{"role": "user", "content": "\udfff"}])


def test_ids_outside_the_vocabulary_are_refused(bpe):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        bpe.decode([1, 400])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        bpe.stream_decoder().push(-1)
    with pytest.raises(TokenizerError, match="must be integers"):
        bpe.decode(["a"])


def test_non_text_is_refused(bpe):
    with pytest.raises(TokenizerError, match="got bytes"):
        bpe.encode(b"bytes")


# --- the default model, against transformers ----------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now in emoji 🙂 and code: `x = [1, 2]`\n\n  indented"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "<|im_start|> is a special token"},
    ],
]


@pytest.fixture(scope="module")
def reference_tokenizers(default_model_dir):
    transformers = pytest.importorskip("transformers")
    return load_tokenizer(default_model_dir), transformers.AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_chats_match_transformers(reference_tokenizers, messages, add_generation_prompt):
    ours, theirs = reference_tokenizers
    options = {"add_generation_prompt": add_generation_prompt}
    assert ours.render_chat(messages, **options) == theirs.apply_chat_template(
        messages, tokenize=False, **options
    )
    expected_ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **options)
    assert ours.encode_chat(messages, **options) == list(expected_ids)


def test_default_model_plain_text_matches_transformers(reference_tokenizers):
    ours, theirs = reference_tokenizers
    for text in ["Hello world", "  2024-06-30 digits 3.14159", "Größe 東京 👨‍👩‍👧", "def f(x):\n\treturn x"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    assert (ours.bos_id, ours.eos_id) == (1, 2)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "ran for more than 2 s",
        ),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "wrote more than"),
        ("{{ 'a' * 1000000000 }}", "repeating a str 1000000000 times is too large"),
        ("{{ [0] * 1000000000 }}", "repeating a list 1000000000 times is too large"),
        ("{{ 'x'.ljust(1000000000) }}", "an argument of 1000000000 is too large"),
    ],
)
def test_runaway_templates_are_stopped_fast_and_clearly(bpe_dir, tmp_path, template, message):
    tokenizer = with_template(bpe_dir, tmp_path, template)
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=f"the chat template was stopped: .*{message}"):
        tokenizer.render_chat(CHAT)
    assert time.monotonic() - started < 10


def test_a_long_document_renders_within_the_bounds(bpe_dir, tmp_path):
    document = "word " * 500_000  # 2.5 MB of text in one message
    rendered = with_template(bpe_dir, tmp_path, CHATML_TEMPLATE).render_chat(
        [{"role": "user", "content": document}]
    )
    assert document in rendered
