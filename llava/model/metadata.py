"""One metadata record per model: the settings that say how the model is prompted and fed.

Written at export as `llava_metadata.json` beside the llava-hf files, and read back by whatever
uses the model next (the next training stage, evaluation, serving, the MLflow pyfunc), so none of
them re-derives a setting with its own rule: which chat template it was trained with, how images
were prepared, how many placeholder tokens an image takes, which tokens end a turn, and which base
vision and language checkpoints it was built from. A processed dataset's manifest carries the same
dataset fields (template, image mode, image tokens), which training compares with its config.

Models exported before this record existed have no file: `read_metadata` returns None and callers
fall back to what the checkpoint itself holds (generation config, processor).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava.data.templates import get_template

METADATA_FILE = "llava_metadata.json"
FORMAT_VERSION = 1


class MetadataError(ValueError):
    """A metadata record that is malformed or contradicts the settings it is checked against."""


@dataclass(frozen=True)
class ModelMetadata:
    template: str
    image_mode: str
    image_tokens_per_image: int
    stop_token_ids: tuple[int, ...]
    base_vision: str | None = None
    base_language_model: str | None = None
    stage: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self), "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> ModelMetadata:
        fields = set(cls.__dataclass_fields__)
        missing = sorted(f for f in ("template", "image_mode", "image_tokens_per_image", "stop_token_ids")
                         if f not in data)
        if missing:
            raise MetadataError(f"{source}: missing {', '.join(missing)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise MetadataError(f"{source}: format_version {data['format_version']} is newer than this code "
                                f"reads ({FORMAT_VERSION})")
        values = {k: v for k, v in data.items() if k in fields}
        values["stop_token_ids"] = tuple(int(i) for i in values["stop_token_ids"])
        return cls(**values)


def stop_token_ids(tokenizer, template: str) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS and the template's end-of-turn token
    (chatml's `<|im_end|>`), whichever the vocabulary knows as a single token."""
    eos_text = get_template(template, eos_token=tokenizer.eos_token).eos
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eos_text)} - {None, tokenizer.unk_token_id}
    return tuple(sorted(int(i) for i in ids))


def describe_model(processor, *, template: str, image_mode: str, base_vision: str | None = None,
                   base_language_model: str | None = None, stage: int | None = None) -> ModelMetadata:
    from llava.model.builder import num_image_tokens

    return ModelMetadata(
        template=template,
        image_mode=image_mode,
        image_tokens_per_image=num_image_tokens(processor),
        stop_token_ids=stop_token_ids(processor.tokenizer, template),
        base_vision=base_vision,
        base_language_model=base_language_model,
        stage=stage,
    )


def apply_metadata(model, processor, meta: ModelMetadata) -> None:
    """Make the checkpoint itself agree with the record: the chat template and the generation
    config's stop tokens are what transformers and vLLM read when they load the directory alone."""
    tokenizer = processor.tokenizer
    processor.chat_template = get_template(meta.template, eos_token=tokenizer.eos_token).chat_template
    model.generation_config.eos_token_id = list(meta.stop_token_ids)


def write_metadata(model_dir: str | Path, meta: ModelMetadata) -> Path:
    path = Path(model_dir) / METADATA_FILE
    path.write_text(json.dumps(meta.to_dict(), indent=1, sort_keys=True))
    return path


def read_metadata(model_dir: str | Path) -> ModelMetadata | None:
    """The record saved with the model at `model_dir`, or None for a model exported without one."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetadataError(f"{path}: not JSON ({err.msg})") from None
    return ModelMetadata.from_dict(data, str(path))


def check_dataset_fields(found: dict[str, Any], *, template: str, image_mode: str, source: str) -> None:
    """Fail when a processed dataset was encoded with another template or image mode than the
    config trains with (the shards hold the rendered tokens: the config cannot change them)."""
    wrong = [f"{key} {found[key]!r} (config: data.{key}={want!r})"
             for key, want in (("template", template), ("image_mode", image_mode))
             if found.get(key) is not None and found[key] != want]
    if wrong:
        raise MetadataError(f"{source} was encoded with " + " and ".join(wrong)
                            + "; re-run pre-processing with these settings or change the training config")
