"""The real Llama 3 and Qwen2 tokenizers, rebuilt offline for tests (a helper module, not a test file).

The BPE ranks come from tiktoken files that PyPI packages ship: Meta's `llama-models` (llama3/tokenizer.model)
and Alibaba's `dashscope` (resources/qwen.tiktoken, the BPE that Qwen2 and Qwen2.5-VL kept). They are turned
into a `tokenizers` byte-level BPE laid out as the checkpoints' tokenizer.json files are: the same vocabulary,
merges, split regex, special tokens at their real ids, and for Llama 3 the BOS-prepending post-processor.
The built tokenizer.json is cached (keyed by the rank file's sha256): building takes 1-3 s, a cached load 0.3 s.

    tok = real_tokenizer("llama3")   # or "qwen2"; raises RealTokenizerUnavailable without the package
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    MllamaImageProcessor,
    MllamaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_pipeline.architectures import mllama, qwen2_5_vl

# The checkpoints' chat templates as the project ships them (byte-identical to shared/real_checkpoints/).
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "model_configs"
CACHE = Path(os.environ.get("VLM_PIPELINE_TEST_CACHE", Path.home() / ".cache" / "vlm-pipeline-test"))

# The tiktoken split patterns: Llama 3 groups digits by up to three, Qwen2 splits every digit.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Llama 3.1's 256 control tokens from 128000 (3.2-Vision renames 128005 to <|step_id|> and adds <|image|>=128256).
_LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL = _LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_LLAMA3_NAMED))]

# Qwen2.5(-VL)'s added tokens from 151643; the last eight are added but not special (special=False).
QWEN2_SPECIAL = [
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
]
QWEN2_ADDED = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]


@dataclass(frozen=True)
class Family:
    package: str  # the import name of the PyPI package that ships the rank file
    rank_file: str  # its path inside the package
    sha256: str
    n_ranks: int
    pattern: str
    special: list[str]
    added: list[str]
    checkpoint: str  # folder under conf/model_configs holding chat_template.jinja
    bos: str | None
    eos: str
    pad: str | None


FAMILIES = {
    "llama3": Family(
        "llama_models",
        "llama3/tokenizer.model",
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
        128000,
        LLAMA3_PATTERN,
        LLAMA3_SPECIAL,
        [],
        "llama-3.1-8b-instruct",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
    ),
    "qwen2": Family(
        "dashscope",
        "resources/qwen.tiktoken",
        "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
        151643,
        QWEN2_PATTERN,
        QWEN2_SPECIAL,
        QWEN2_ADDED,
        "qwen2.5-vl-7b-instruct",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    ),
}


class RealTokenizerUnavailable(RuntimeError):
    """The package that ships the rank file is not installed (or its file is not the expected one)."""


def rank_file(family: str) -> Path:
    """The tiktoken rank file of a family, found in its package without importing the package."""
    fam = FAMILIES[family]
    spec = importlib.util.find_spec(fam.package)
    if spec is None or not spec.submodule_search_locations:
        raise RealTokenizerUnavailable(
            f"{family}: the package {fam.package!r} is not installed; it ships {fam.rank_file} (pip install '.[test]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fam.rank_file
    if not path.is_file():
        raise RealTokenizerUnavailable(f"{family}: {path} is missing from the installed {fam.package!r}")
    return path


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the rest move to 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in mapping)})
    return mapping


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _all_split_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of each token whose halves are tokens, in the token's rank order.

    Llama 3's tokenizer.json lists merges this way (280,147 of them): some tokens cannot be reached by any single
    lower-ranked merge path, and tiktoken merges any adjacent pair whose concatenation is a token."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def _replayed_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per token: the last step of byte-pair-encoding the token with only lower ranks.

    Qwen2's merges.txt lists merges this way (151,387 of them, one per multi-byte token)."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank >= ranks[token]:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _build(family: str, ranks: dict[bytes, int]) -> Tokenizer:
    fam = FAMILIES[family]
    alphabet = _byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    pairs = _all_split_merges(ranks) if family == "llama3" else _replayed_merges(ranks)
    merges = [(text(a), text(b)) for a, b in pairs]
    if family == "llama3":
        # A pre-token that is itself in the vocabulary is taken whole, as tiktoken does (588 Llama 3 words, e.g.
        # " Việt", no merge path reaches). Llama 3's tokenizer.json sets it, as transformers' TikTokenConverter does.
        options = {"ignore_merges": True}
    else:  # Qwen2's tokenizer.json: every token is reachable, plain BPE
        options = {"ignore_merges": False, "continuing_subword_prefix": "", "end_of_word_suffix": ""}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, **options))
    split = pre_tokenizers.Split(Regex(fam.pattern), behavior="isolated", invert=False)
    if family == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
    for content in fam.special + fam.added:  # one at a time, so each takes the next id
        added = AddedToken(content, special=content in fam.special, normalized=False)
        (tok.add_special_tokens if added.special else tok.add_tokens)([added])
    for offset, content in enumerate(fam.special + fam.added):
        assert tok.token_to_id(content) == fam.n_ranks + offset, content
    if family == "llama3":  # plain tokenizer(text) calls prepend <|begin_of_text|>, as the checkpoint's do
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
                processors.TemplateProcessing(
                    single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos}:1 $B:1", special_tokens=[(fam.bos, 128000)]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        spec = json.loads(tok.to_str())  # Qwen's file spells its decoder's (inert) options as the post-processor's
        spec["decoder"] = spec["post_processor"]
        tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    return tok


def tokenizer_file(family: str) -> Path:
    """The cached tokenizer.json of a family, built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    source = rank_file(family)
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != fam.sha256:
        raise RealTokenizerUnavailable(f"{family}: {source} has sha256 {digest}, expected {fam.sha256}")
    out = CACHE / f"{family}-{digest[:16]}" / "tokenizer.json"
    if not out.is_file():
        ranks = _load_ranks(source)
        assert len(ranks) == fam.n_ranks and sorted(ranks.values()) == list(range(fam.n_ranks)), source
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f"tokenizer.json.{os.getpid()}.tmp")
        _build(family, ranks).save(str(partial))
        partial.replace(out)  # atomic: concurrent workers never read a half-written file
    return out


def real_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The real tokenizer of "llama3" (Llama 3.1-8B-Instruct) or "qwen2" (Qwen2.5-VL-7B-Instruct).

    bos/eos/pad are set as the checkpoints set them (Llama 3.1: <|begin_of_text|>, <|eot_id|>, no pad;
    Qwen2.5-VL: no bos, <|im_end|>, <|endoftext|>) and chat_template is the checkpoint's, read verbatim.
    Raises RealTokenizerUnavailable when the package that ships the rank file is not installed."""
    path = tokenizer_file(family)
    fam = FAMILIES[family]
    template = (MODEL_CONFIGS / fam.checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    # Qwen2.5-VL's tokenizer_config.json lists its 13 control tokens after <|endoftext|>; Llama 3.1's lists none.
    extra = {"additional_special_tokens": fam.special[1:]} if family == "qwen2" else {}
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad,
        chat_template=template,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,  # Llama's config says True, but transformers 5 ignores it for BPE
        **extra,
    )


def real_processor(arch: str):
    """The real tokenizer (128k/152k vocabulary) inside the real processor classes and settings."""
    if arch == "llama":
        return real_tokenizer("llama3")
    if arch == "qwen2_5_vl":
        settings = qwen2_5_vl.REAL.image_processor_settings()
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**settings),
            tokenizer=real_tokenizer("qwen2"),
            video_processor=Qwen2VLVideoProcessor(**settings),
            chat_template=qwen2_5_vl.REAL.chat_template(),
        )
    tokenizer = real_tokenizer("llama3")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})  # id 128256, as in 3.2-Vision
    assert tokenizer.convert_tokens_to_ids("<|image|>") == 128256
    return MllamaProcessor(
        image_processor=MllamaImageProcessor(**mllama.REAL.image_processor_settings()),
        tokenizer=tokenizer,
        chat_template=mllama.REAL.chat_template(),
    )
