"""A small, deterministic byte-level BPE tokenizer trained offline for the tiny models.

Real checkpoints ship 128k-152k token vocabularies; the tiny models only need a tokenizer that behaves like the
real one (byte-level, so any text, Korean included, round-trips; the family's own pre-tokenizer split pattern,
so text splits at the same places, chat-template boundaries included; the real special tokens; the real chat
template) while keeping the embedding matrix small. The corpus is built into this module so the same seed
always gives the same ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1200  # BPE vocabulary before special tokens; the built-in corpus saturates just below it

# The real tokenizers' split patterns (tokenizer.json's pre_tokenizer): Llama 3 groups up to three digits,
# Qwen2 splits every digit. Both keep "\n\n" apart from the word after it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "rectangle", "hexagon", "oval")
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand"
).split()
QUESTIONS = (
    "What color is the shape?",
    "What colour is this shape?",
    "Which color is the shape in the image?",
    "Which shape is shown?",
    "Which shape is shown in the image?",
    "What shape is this?",
    "What is the shape in the picture?",
    "How many shapes are in the image?",
    "How many sides does it have?",
    "Describe the image in one word.",
    "Is the shape on the left or on the right?",
)
GLOSSARY = {
    "beam": "A long horizontal member that carries loads across an opening or between supports.",
    "column": "A vertical member that carries loads from the structure above down to the foundation.",
    "slab": "A flat horizontal plate of reinforced concrete that forms a floor or roof.",
    "footing": "The widened base of a foundation that spreads the load of a wall into the soil.",
    "lintel": "A horizontal beam over a door or window that carries the wall above it.",
    "rebar": "Steel reinforcing bar placed in concrete to carry tensile forces.",
    "truss": "A rigid framework of members joined in triangles that spans a roof or a bridge.",
    "joist": "One of a series of parallel horizontal members that support a floor or ceiling.",
    "screed": "A thin level layer of cement and sand laid over a slab to give a smooth surface.",
    "drywall": "Panels of gypsum plaster between sheets of paper, used to line interior walls.",
    "formwork": "A temporary mould into which fresh concrete is poured until it sets.",
    "scaffolding": "A temporary structure of tubes and boards that gives workers safe access at height.",
    "parapet": "A low protective wall along the edge of a roof, balcony or bridge.",
    "cantilever": "A beam or slab fixed at one end only, projecting beyond its support.",
    "curing": "Keeping freshly placed concrete moist and warm so that it gains its full strength.",
    "bracing": "Diagonal members added to a frame to keep it stable against sideways loads.",
    "mortar": "A paste of cement, lime, sand and water used to bind bricks and blocks.",
    "plinth": "The raised base on which a column, wall or building stands.",
    "retaining wall": "A wall built to hold back soil where the ground level changes.",
    "precast concrete": "Concrete elements cast in a factory, then transported to the site and installed.",
    "header": "A horizontal framing member over an opening in a timber frame wall.",
    "insulation": "Material that reduces the flow of heat or sound through a wall, roof or floor.",
    "damp proof course": "A barrier laid in a wall to stop moisture rising from the ground.",
    "load bearing wall": "A wall that supports the weight of the floors and roof above it.",
}
INSTRUCTIONS = (
    "Explain the following building term in one sentence.",
    "Define the construction term.",
    "What does this construction term mean?",
    "Briefly describe what the term means on a building site.",
    "Answer the question with a single word.",
    "Summarise the text below in plain English.",
    "Give a short and helpful answer.",
    "You are a helpful assistant.",
    "Please read the instruction carefully and write a response that completes the request.",
    "Translate the sentence into simple English and keep the meaning.",
    "List three important safety rules for workers on a construction site.",
    "The answer is correct. Thank you for your question, here is the information you asked for.",
    "Use the image to answer the question. Look at the picture and tell me what you see.",
    "The quick brown fox jumps over the lazy dog while the engineer checks the drawings.",
)


def corpus() -> Iterator[str]:
    """The fixed training corpus: shapes/colours VQA phrasing, numbers, instructions and a building glossary."""
    yield from INSTRUCTIONS
    yield from QUESTIONS
    # Chat templates put "\n" and "\n\n" between headers and text: real vocabularies hold both as tokens.
    for text in INSTRUCTIONS + QUESTIONS:
        yield f"assistant\n\n{text}\n\nuser\n{text}\nsystem\n"
    for colour in COLOURS:
        for shape in SHAPES:
            yield f"A {colour} {shape} on a white background. The shape is a {shape} and its colour is {colour}."
            yield f"{colour.capitalize()} {shape}. {shape.capitalize()}s, {colour} things."
    for number, word in enumerate(NUMBER_WORDS[:21]):
        yield f"{number} {word} {word.capitalize()} There are {word} shapes. {number * 7} {number + 100}"
    yield " ".join(NUMBER_WORDS) + " 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.5 50%"
    for term, definition in GLOSSARY.items():
        for instruction in INSTRUCTIONS[:4]:
            yield f"{instruction} {term}: {definition}"
        yield f"What is meant by '{term}' in construction? {definition}"


def train_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    chat_template: str,
    split_pattern: str,
    prepend_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """Train the BPE model and wrap it; special tokens get ids after the BPE vocabulary, in the given order.

    ``split_pattern`` is the family's pre-tokenizer regex; ``pad_token`` None leaves the pad token unset, as
    Llama 3.1 Instruct does.

    ``prepend_bos`` adds ``bos_token`` to every plain ``tokenizer(text)`` call as Llama 3 does; chat templates
    write it themselves and ``apply_chat_template`` encodes without special tokens, so it is never doubled.
    """
    backend = _train_bpe(split_pattern)
    backend.add_special_tokens(list(special_tokens))
    if prepend_bos:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,  # keep decoded text byte-exact (" ." must stay " .")
        model_max_length=32768,
    )


def _train_bpe(split_pattern: str) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # The full 256-byte alphabet is what lets text outside the corpus (Korean, emoji) still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    return backend
