"""Which tokens a conversation trains on, found with the checkpoint's own chat template, unchanged.

Each assistant turn's tokens are located by rendering the conversation twice through the processor (image
placeholders expanded): up to the turn with ``add_generation_prompt=True``, and up to the turn's end. The
shorter rendering must be a token prefix of the longer one, and every rendering a prefix of the whole
conversation; the turn is what the longer one adds, cut after its end-of-turn token (so Qwen's ``"\\n"`` after
``<|im_end|>`` is not trained). This needs nothing from the template (no ``{% generation %}`` markers, no role
markers in token ids) except that it does not rewrite earlier turns when a later one is added; where it does,
``ChatTemplateError`` says so. Where a template has ``{% generation %}`` markers, their mask must agree.

Every rendering is rendered to text and tokenized by the tokenizer alone, and each of the processor's image
placeholders (its ``image_token_id``) is repeated as often as the processor repeats it for that image
(``PlaceholderRuns``: Qwen2.5-VL's run follows the image size, Mllama's is 1), so no family needs code for it.
The processor tells those counts itself (``ImageTokenCounts``): the first record whose images have a given list of
sizes goes through it whole (its images processed once, the cost of a bare ``datasets.map`` of one processor call),
and the counts it gave are kept for that list of sizes. Where the processor also counts from sizes alone (the rule
transformers keeps for vLLM, ``_get_num_multimodal_tokens``: Qwen2.5-VL has it, Mllama not) and that rule agreed
with its own output on the first record, unseen sizes are counted by the rule. Either way a record needs no image
processing of its own: preprocessing keeps no pixels, only the token ids.

Where a rendering then fails a check, every rendering goes through the processor with its own images and the
checks are repeated on those ids, so an error (or a result) is always the processor's own;
``ChatEncoder(..., reference=True)`` takes that path from the start (the tests compare the two,
tests/test_label_paths.py). A tokenizer without a processor, or a conversation with other visual parts (video,
audio, an image by URL), takes it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jinja2
import tokenizers
from jinja2 import meta

GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


class ChatTemplateError(ValueError):
    """The chat template cannot show which tokens are the assistant's; the message names the record and why."""


class TurnBoundaryMerge(ValueError):
    """One record's text merges into one token with the template's text before it (e.g. an answer that starts
    with a newline after Qwen's ``assistant\n``): its labels would start mid-token, so the record is set aside."""


def chat_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: text-only content as one string, image parts kept as parts.

    The Llama 3 templates ``trim`` a message's content and so need a string; every template takes one.
    """
    converted = []
    for message in messages:
        parts = message["content"]
        if isinstance(parts, list) and all(part.get("type") == "text" for part in parts):
            converted.append({"role": message["role"], "content": "".join(part["text"] for part in parts)})
        else:
            converted.append(message)
    return converted


@dataclass
class ImageTokenCounts:
    """How many placeholder tokens the processor gives each image of a record, by the record's image sizes (width,
    height) in order: a processor may count an image differently beside others, so the key is the whole list."""

    by_sizes: dict[tuple[tuple[int, int], ...], list[int]] = field(default_factory=dict)
    sizes_rule: bool | None = None
    """The processor's count from sizes alone agreed with its output on the first record with images (None: not
    compared yet, or the processor has no such rule)."""

    def known(self, processor: Any, sizes: tuple[tuple[int, int], ...]) -> list[int] | None:
        """The counts for images of these sizes, if the processor gave them before or its size rule is trusted."""
        if sizes not in self.by_sizes and self.sizes_rule:
            counted = _counted_from_sizes(processor, sizes)
            if counted is not None:
                self.by_sizes[sizes] = counted
        return self.by_sizes.get(sizes)

    def learn(self, processor: Any, sizes: tuple[tuple[int, int], ...], counts: list[int]) -> None:
        """Keep the counts the processor gave for a record with images of these sizes; the first time there are
        images, compare its size rule with them."""
        self.by_sizes[sizes] = counts
        if self.sizes_rule is None and sizes:
            counted = _counted_from_sizes(processor, sizes)
            self.sizes_rule = None if counted is None else counted == counts


def _counted_from_sizes(processor: Any, sizes: tuple[tuple[int, int], ...]) -> list[int] | None:
    """The processor's placeholder count per image from the sizes alone (what vLLM calls), None without the rule."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None:
        return None
    try:
        counted = count(image_sizes=[(height, width) for width, height in sizes])
    except (AttributeError, KeyError, NotImplementedError, TypeError, ValueError):
        return None  # a rule this processor does not implement for images: its own output decides
    tokens = getattr(counted, "num_image_tokens", None)
    return None if tokens is None else [int(n) for n in tokens]


@dataclass(frozen=True)
class ChatEncoder:
    """A processor (or tokenizer), the template variables every rendering gets, and the end-of-turn token."""

    processor: Any
    end_of_turn_token: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reference: bool = False
    """Render every prefix through the processor too (images processed each time): the path the cheaper one is
    tested against (tests/test_label_paths.py)."""
    image_tokens: ImageTokenCounts = field(default_factory=ImageTokenCounts, init=False, compare=False)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def takes_images(self) -> bool:
        """A processor with an image processor; a text-only model's tokenizer has none."""
        return hasattr(self.processor, "image_processor")

    @cached_property
    def render_kwargs(self) -> dict[str, Any]:
        """The template variables this template reads (a processor takes any other keyword as its own)."""
        # transformers' own extension parses {% generation %}; plain jinja2 only needs it gone to list variables.
        template = GENERATION_TAGS.sub("", _template_text(self.processor))
        names = meta.find_undeclared_variables(
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        )
        return {key: value for key, value in self.template_kwargs.items() if key in names}

    def render_ids(self, conversation: list[dict], *, add_generation_prompt: bool) -> list[int]:
        """Token ids of ``conversation`` as the template writes it, image placeholders expanded."""
        encoded = self.processor.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            **self.render_kwargs,
        )
        return _first_row(encoded["input_ids"])

    def render_text(self, conversation: list[dict], *, add_generation_prompt: bool) -> str:
        """The template's text for ``conversation``, image placeholders as the template writes them."""
        return self.processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **self.render_kwargs
        )

    def text_ids(self, text: str) -> list[int]:
        """``text`` tokenized as the processor's ``apply_chat_template`` tokenizes it, before expanding images:
        special tokens added unless the text already starts with BOS."""
        add_special_tokens = self._adds_special_tokens(text)
        if self._backend is not None:  # what a fast tokenizer's __call__ runs, without its per-call Python overhead
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _adds_special_tokens(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    @cached_property
    def _backend(self) -> Any:
        backend = getattr(self.tokenizer, "_tokenizer", None)
        return backend if isinstance(backend, tokenizers.Tokenizer) else None

    def _renderer(self, conversation: list[dict]) -> tuple[list[int], Callable[..., list[int]]]:
        """The whole conversation's ids (one processor call) and the function that renders its prefixes."""
        images = _attached_images(conversation)
        image_token = getattr(self.processor, "image_token_id", None)
        if self.reference or not isinstance(image_token, int) or images is None:
            # A bare tokenizer's render_ids is text + tokens already; any other visual part goes the processor's way.
            return self.render_ids(conversation, add_generation_prompt=False), self.render_ids
        text = self.render_text(conversation, add_generation_prompt=False)
        sizes = tuple(image.size for image in images)
        counts = self.image_tokens.known(self.processor, sizes)
        full = None
        if counts is not None:
            runs = PlaceholderRuns(image_token, counts)
            full = runs.expand(self.text_ids(text), every_image=True)
        if full is None:
            # What the processor's apply_chat_template does once it has rendered the text: one call with the images.
            options = {} if self._adds_special_tokens(text) else {"add_special_tokens": False}
            full = _first_row(self.processor(text=text, images=[images] if images else None, **options)["input_ids"])
            runs = PlaceholderRuns.of(full, image_token, len(images))
            if runs is None:
                return full, self.render_ids
            self.image_tokens.learn(self.processor, sizes, runs.lengths)

        def render(prefix: list[dict], *, add_generation_prompt: bool) -> list[int]:
            expanded = runs.expand(self.text_ids(self.render_text(prefix, add_generation_prompt=add_generation_prompt)))
            return (
                self.render_ids(prefix, add_generation_prompt=add_generation_prompt) if expanded is None else expanded
            )

        return full, render

    def assistant_spans(self, conversation: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
        """The conversation's token ids and one ``(start, end)`` per assistant turn (end exclusive).

        ``conversation`` holds the images in its image parts (see ``encoding.attach_images``). Raises
        ``ChatTemplateError`` when a rendering is not a token prefix of the next one.
        """
        conversation = chat_messages(conversation)
        full, render = self._renderer(conversation)
        if render == self.render_ids:
            return self._spans(conversation, full, render)
        try:
            return self._spans(conversation, full, render)
        except (ChatTemplateError, TurnBoundaryMerge):
            # A shorter rendering did not line up with the processor's ids: let the processor render every one
            # (each with its own images), so that the error, or the result, is exactly the processor's.
            return self._spans(
                conversation, self.render_ids(conversation, add_generation_prompt=False), self.render_ids
            )

    def _spans(
        self, conversation: list[dict], full: list[int], render: Callable[..., list[int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        end_of_turn = self.tokenizer.convert_tokens_to_ids(self.end_of_turn_token)
        spans = []
        for turn, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = render(conversation[:turn], add_generation_prompt=True)
            last_message = turn == len(conversation) - 1  # the usual case: its rendering is the whole conversation
            through = full if last_message else render(conversation[: turn + 1], add_generation_prompt=False)
            _require_prefix(before, through, f"up to assistant turn {turn} with the generation prompt", "that turn")
            _require_prefix(through, full, f"up to the end of assistant turn {turn}", "the whole conversation")
            span = through[len(before) :]
            if not span:  # the template writes nothing for this turn: nothing to learn from it
                continue
            if end_of_turn not in span:
                raise ChatTemplateError(
                    f"assistant turn {turn} does not end with {self.end_of_turn_token}: the template writes "
                    f"{self.tokenizer.decode(span)!r}"
                )
            last = len(span) - 1 - span[::-1].index(end_of_turn)
            spans.append((len(before), len(before) + last + 1))
        if GENERATION_BLOCK.search(_template_text(self.processor)):
            self._check_generation_markers(conversation, full, spans)
        return full, spans

    def _check_generation_markers(
        self, conversation: list[dict], full: list[int], spans: list[tuple[int, int]]
    ) -> None:
        encoded = self.processor.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **self.render_kwargs
        )
        marked = _first_row(encoded["assistant_masks"])
        found = [0] * len(full)
        for start, end in spans:
            found[start:end] = [1] * (end - start)
        if marked != found:
            first = next(i for i, (a, b) in enumerate(zip(marked, found, strict=True)) if a != b)
            raise ChatTemplateError(
                f"the template's {{% generation %}} markers disagree with the rendered turns from token {first} "
                f"({self.tokenizer.decode(full[max(first - 3, 0) : first + 3])!r})"
            )


@dataclass(frozen=True)
class PlaceholderRuns:
    """How the processor expanded the text's image placeholder: how many ``token`` each image became, in order
    (the k-th placeholder in the text is the k-th image's; Qwen2.5-VL's count follows the image size, Mllama's
    is 1)."""

    token: int
    lengths: list[int]

    @classmethod
    def of(cls, processed_ids: list[int], token: int, images: int) -> PlaceholderRuns | None:
        """The counts, read from the processor's ids of a whole conversation with ``images`` images. None where
        they cannot be told apart: images whose placeholders ran together, each more than one token."""
        runs: list[int] = []
        previous = None
        for current in processed_ids:
            if current == token:
                if previous == token:
                    runs[-1] += 1
                else:
                    runs.append(1)
            previous = current
        if sum(runs) == images:  # every image is at least one token: here each is exactly one
            return cls(token, [1] * images)
        return cls(token, runs) if len(runs) == images else None

    def expand(self, text_ids: list[int], *, every_image: bool = False) -> list[int] | None:
        """The processor's ids for a rendering of the first turns of that conversation, from the tokenizer's ids
        of its text: each placeholder repeated as the processor repeated it. None where the rendering holds more
        placeholders than the conversation has images, or, with ``every_image`` (a whole conversation), fewer."""
        out: list[int] = []
        seen = 0
        for current in text_ids:
            if current != self.token:
                out.append(current)
            elif seen == len(self.lengths):
                return None
            else:
                out += [current] * self.lengths[seen]
                seen += 1
        return None if every_image and seen < len(self.lengths) else out


def _attached_images(conversation: list[dict]) -> list[Any] | None:
    """The images a processor's ``apply_chat_template`` would pass on, in order; None where a part is anything but
    text or an attached image (a video, audio, an image by URL): those are left to ``apply_chat_template``."""
    images = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or not content:
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" and set(part) <= {"type", "image"}:
                images += [part["image"]] if "image" in part else []
            elif kind != "text":
                return None
    return images


def _require_prefix(shorter: list[int], longer: list[int], what: str, than: str) -> None:
    if longer[: len(shorter)] == shorter:
        return
    differing = (i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b)
    first = next(differing, min(len(shorter), len(longer)))
    if first == len(shorter) - 1:
        raise TurnBoundaryMerge(
            f"the text after the conversation rendered {what} merges with its last token ({shorter[-1]} becomes "
            f"{longer[first]}): labels would start inside a token"
        )
    raise ChatTemplateError(
        f"the chat template is not prefix-preserving: the conversation rendered {what} is not a token prefix of "
        f"{than} (they differ from token {first}); it rewrites earlier turns or merges tokens across a turn "
        "boundary. Set preprocessing.chat_template to a .jinja file that renders earlier turns unchanged"
    )


def _template_text(processor: Any) -> str:
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    return template if isinstance(template, str) else ""


def _first_row(values: Any) -> list[int]:
    # Processors return a batch of one ([[...]]); tokenizers return a flat list for one conversation.
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return list(values[0]) if values and isinstance(values[0], list) else values
