"""One LLaVA record -> input ids, labels and images, with the label mask taken from the token
offsets of the single real tokenization of the rendered prompt.

The reference code re-tokenises prompt pieces and counts; when the counts disagree it silently
masks the whole sample (loss 0). Here every token is checked against the character spans of the
supervised text: a token inside a span is supervised, a token outside is not, and a token that
straddles a span boundary makes the sample impossible to mask exactly, so it is rejected with a
reason instead of being trained on wrong labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image

from llava.data.images import ImageError, ImageMode, open_image, prepare_image
from llava.data.records import RecordError, image_list, to_messages
from llava.data.templates import IMAGE_TOKEN, Template, TemplateError, get_template
from llava.errors import ReasonedError

IGNORE_INDEX = -100


class SampleRejected(ReasonedError):
    """A record that cannot become a training sample. `reason` starts with a short code."""


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image] = field(default_factory=list)
    modality: str = "text"

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@lru_cache(maxsize=16)
def _template(name: str, eos: str) -> Template:
    return get_template(name, eos_token=eos)


def image_token_count(processor) -> int:
    """Placeholder tokens per image, as LlavaProcessor expands them."""
    from llava.model.builder import num_image_tokens  # local: data must not need the model at import

    return num_image_tokens(processor)


def _check_special_text(messages: list[dict], tokenizer) -> None:
    """Control-token text inside content would be read as the real token (an answer holding
    '</s>' would teach the model to stop there); such data is rejected, not silently trained on."""
    specials = [t for t in tokenizer.all_special_tokens if t != IMAGE_TOKEN]
    for i, msg in enumerate(messages):
        for tok in specials:
            if tok in msg["content"]:
                raise SampleRejected(f"special_token_in_text: turn {i} ({msg['role']}) contains {tok!r}")
        if msg["role"] != "user" and IMAGE_TOKEN in msg["content"]:
            raise SampleRejected(f"placeholder_mismatch: turn {i} ({msg['role']}) contains {IMAGE_TOKEN}")


def _expand_images(text: str, spans: list[tuple[int, int]], n_tokens: int) -> tuple[str, list[tuple[int, int]]]:
    """Replace each <image> with n copies and shift the supervised spans accordingly."""
    grow = len(IMAGE_TOKEN) * (n_tokens - 1)
    positions = []
    start = text.find(IMAGE_TOKEN)
    while start != -1:
        positions.append(start)
        start = text.find(IMAGE_TOKEN, start + len(IMAGE_TOKEN))
    shifted = [(s + grow * sum(p < s for p in positions), e + grow * sum(p < e for p in positions)) for s, e in spans]
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_tokens), shifted


def mask_from_offsets(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], tokens: list[str]
) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (s, e) in enumerate(offsets):
        if e <= s:  # tokens added by the post-processor (BOS) cover no text
            continue
        for a, b in spans:
            if a <= s and e <= b:
                labels[i] = input_ids[i]
                break
            if s < b and a < e:
                raise SampleRejected(
                    f"mask_boundary: token {tokens[i]!r} at chars {s}-{e} straddles supervised text {a}-{b}"
                )
    return labels


def load_images(names: list[str], image_root: str | Path | None, processor, mode: ImageMode,
                max_pixels: int) -> list[Image.Image]:
    out = []
    for name in names:
        path = Path(image_root) / name if image_root is not None else Path(name)
        try:
            out.append(prepare_image(open_image(path, max_pixels=max_pixels), processor.image_processor, mode))
        except ImageError as err:
            raise SampleRejected(f"image_{err}") from None
    return out


def encode_record(
    record: dict,
    processor,
    template: str,
    *,
    max_length: int,
    image_root: str | Path | None = None,
    images: list[Image.Image] | None = None,
    image_mode: ImageMode = "pad",
    max_pixels: int = 64_000_000,
    load_pixels: bool = True,
) -> EncodedSample:
    """Encode one record. `images` may be given already decoded (Parquet input); otherwise they are
    read from `image_root`. `load_pixels=False` skips image decoding (mask inspection only)."""
    tokenizer = processor.tokenizer
    try:
        messages = to_messages(record)
        names = image_list(record)
        _check_special_text(messages, tokenizer)
        rendered = _template(template, tokenizer.eos_token).render(messages)
    except (RecordError, TemplateError) as err:
        raise SampleRejected(str(err) if ":" in str(err) else f"schema: {err}") from None

    n_img = image_token_count(processor)
    text, spans = _expand_images(rendered.text, rendered.supervised, n_img)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    if len(ids) > max_length:
        raise SampleRejected(f"too_long: {len(ids)} tokens > max_length {max_length} (never truncated through images)")
    labels = mask_from_offsets(ids, list(enc["offset_mapping"]), spans, tokenizer.convert_ids_to_tokens(ids))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ids.count(image_id) != n_img * len(names):
        raise SampleRejected(
            f"image_tokens: tokenizer produced {ids.count(image_id)} image tokens, expected {n_img * len(names)}"
        )
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleRejected("no_supervised_tokens: no assistant answer survives masking")

    if images is None:
        images = load_images(names, image_root, processor, image_mode, max_pixels) if load_pixels else []
    elif len(images) != len(names):
        raise SampleRejected(f"placeholder_mismatch: {len(names)} image name(s) for {len(images)} image(s)")
    else:
        images = [prepare_image(img, processor.image_processor, image_mode) for img in images]
    return EncodedSample(
        id=str(record["id"]), input_ids=ids, labels=labels, images=images,
        modality="image" if names else "text",
    )
