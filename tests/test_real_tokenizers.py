"""The offline rebuilds of the real Llama 3 and Qwen2 tokenizers reproduce published token ids."""

from __future__ import annotations

import pytest
from real_tokenizers import RealTokenizerUnavailable, real_tokenizer


@pytest.fixture(scope="module")
def llama3():
    try:
        return real_tokenizer("llama3")
    except RealTokenizerUnavailable as exc:
        pytest.fail(str(exc))  # the test extras install the packages that carry the rank files


@pytest.fixture(scope="module")
def qwen2():
    try:
        return real_tokenizer("qwen2")
    except RealTokenizerUnavailable as exc:
        pytest.fail(str(exc))  # the test extras install the packages that carry the rank files


def id_list(published: str) -> list[int]:
    """Token ids as published, whitespace-separated: long tables stay a few lines."""
    return [int(token) for token in published.split()]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# Meta's own tokenizer test, meta-llama/llama-models models/llama3/tests/api/test_tokenizer.py (shipped in the
# llama-models 0.3.0 wheel as llama_models/llama3/tests/api/test_tokenizer.py): test_encode and test_encode_dialog.
def test_llama3_ids_published_by_meta(llama3):
    assert llama3("This is a test sentence.")["input_ids"] == [128000, 2028, 374, 264, 1296, 11914, 13]
    dialog = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nThis is a test sentence.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThis is a response.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids(llama3, dialog) == id_list("""
128000 128006 9125 128007 271 2028 374 264 1296 11914 13 128009 128006 882 128007 271 2028 374
264 2077 13 128009 128006 78191 128007 271
""")


def test_llama3_more_published_ids(llama3):
    # belladoreai/llama3-tokenizer-js README (npm llama3-tokenizer-js): "Hello world!" -> [128000, 9906, 1917, 0,
    # 128001] (that library also appends <|end_of_text|>; HF's Llama 3 tokenizer prepends BOS only).
    assert llama3("Hello world!")["input_ids"] == [128000, 9906, 1917, 0]
    # ggml-org/llama.cpp PR #7193: HF tokenizers with Llama 3's tokenizer.json give " Việt" -> [101798], a word no
    # merge path reaches (taken whole from the vocabulary, like tiktoken).
    assert ids(llama3, " Việt") == [101798]


def test_llama3_special_tokens(llama3):
    assert len(llama3) == 128256
    assert (llama3.bos_token, llama3.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (llama3.eos_token, llama3.eos_token_id) == ("<|eot_id|>", 128009)
    assert llama3.pad_token is None  # Llama 3.1-8B-Instruct sets no pad token
    named = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {name: llama3.convert_tokens_to_ids(name) for name in named} == named
    assert ids(llama3, "<|start_header_id|>user<|end_header_id|>") == [128006, 882, 128007]


def test_llama3_chat_template_has_one_bos(llama3):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\n\nHow can I help?"}]
    chat = llama3.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert chat[:5] == [128000, 128006, 9125, 128007, 271]  # <|begin_of_text|> then the system header, "\n\n"
    assert chat.count(128000) == 1
    rendered = llama3.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system")
    assert ids(llama3, rendered) == chat
    # The real tokenizer's trap: tokenizing the rendered text with special tokens on adds a second BOS.
    assert llama3(rendered)["input_ids"][:2] == [128000, 128000]


def test_double_newline_is_one_token_but_merges_after_punctuation(llama3, qwen2):
    assert ids(llama3, "\n\n") == [271]  # "\n\n" is 271 in Meta's test above
    assert len(ids(qwen2, "\n\n")) == 1
    # Why a small local tokenizer is not enough: in the real vocabularies "!\n\n" is one token, so the "\n\n"
    # after an answer's last word is not a token boundary.
    for tok in (llama3, qwen2):
        pieces = tok.convert_ids_to_tokens(ids(tok, "Hello!\n\nHow"))
        assert pieces == ["Hello", "!ĊĊ", "How"]


# huggingface/transformers tests/models/qwen2/test_tokenization_qwen2.py (@04bee35c), test_tokenizer_integration:
# the expected ids of Qwen/Qwen-tokenizer (the Qwen2 BPE), here without the 151643 padding.
QWEN2_INTEGRATION = {
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
    "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
    "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
    "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.": id_list("""
8963 388 320 69514 3881 438 4510 27414 32852 388 323 4510 27414 21334 35722 1455 529 8 5707 4586
58238 77235 320 61437 11 479 2828 12 17 11 11830 61437 64 11 1599 10994 11 27604 321 33 529 11
29881 6954 32574 369 18448 11434 45451 320 45 23236 8 323 18448 11434 23470 320 30042 38 8 448
916 220 18 17 10 80669 4119 304 220 16 15 15 10 15459 323 5538 94130 2897 1948 619 706 11 5355
51 21584 323 94986 13
"""),
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
    "使用预训练模型可以减少计算消耗和碳排放，"
    "并且节省从头训练所需要的时间和资源。": id_list("""
144834 80532 93685 83744 34187 73670 104261 29490 62189 103937 104034 102830 98841 104034 104949
9370 5333 58143 102011 1773 37029 98841 104034 104949 73670 101940 100768 104997 33108 100912
105054 90395 100136 106831 45181 64355 104034 113521 101975 33108 85329 1773
"""),
    '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n'
    'tokenizer("世界，你好！")```': id_list("""
73594 12669 198 85593 284 8979 37434 6387 10442 35722 445 48 16948 45274 16948 34841 3135 1138
85593 445 99489 3837 108386 6313 899 73594
"""),
}


@pytest.mark.parametrize("text", list(QWEN2_INTEGRATION), ids=["english", "chinese", "code"])
def test_qwen2_ids_published_by_transformers(qwen2, text):
    assert qwen2(text)["input_ids"] == QWEN2_INTEGRATION[text]  # no BOS: plain calls add nothing


def test_qwen2_more_published_ids(qwen2):
    # Many public tokenizer probes of Qwen2/2.5 checkpoints give "Hello world" -> [9707, 1879].
    assert qwen2("Hello world")["input_ids"] == [9707, 1879]
    # alibaba/rtp-llm rtp_llm/test/tokenizer_test/qwen2_tokenizer_test.py
    assert qwen2("<|im_start|>hello<|im_end|>")["input_ids"] == [151644, 14990, 151645]
    assert ids(qwen2, "\u03d2\u0301") == ids(qwen2, "\u03d3")  # NFC first, as transformers' Qwen2 test requires


def test_qwen2_special_tokens(qwen2):
    assert len(qwen2) == 151665
    assert qwen2.bos_token is None
    assert (qwen2.eos_token, qwen2.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen2.pad_token, qwen2.pad_token_id) == ("<|endoftext|>", 151643)
    names = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ]
    assert qwen2.convert_tokens_to_ids(names) == list(range(151643, 151665))


def test_qwen2_chat_template(qwen2):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = qwen2.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    chat = qwen2.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert chat == qwen2(rendered)["input_ids"]
    assert chat[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    assert chat[-2:] == [151645, 198]  # <|im_end|> "\n"


def test_unknown_or_missing_family(monkeypatch):
    import real_tokenizers

    with pytest.raises(ValueError, match="unknown tokenizer family"):
        real_tokenizer("gpt2")
    fake = real_tokenizers.FAMILIES["qwen2"].__class__(
        **{**vars(real_tokenizers.FAMILIES["qwen2"]), "package": "no_such_package_for_ranks"}
    )
    monkeypatch.setitem(real_tokenizers.FAMILIES, "qwen2", fake)
    with pytest.raises(RealTokenizerUnavailable, match="no_such_package_for_ranks"):
        real_tokenizer("qwen2")
