"""The MLflow pyfunc model of a registered LLaVA version (MLflow "models from code").

MLflow copies this file into every logged model and executes it at `mlflow.pyfunc.load_model`
time, in whatever environment loads the model: one with MLflow, torch, transformers and Pillow,
and NOT this project. So it imports nothing else (no `llava`, no `llava_platform`); the little it
shares with the model library (square padding of images, the stop rule) is restated here and
checked against the library by tests/platform/test_pyfunc_model.py.

The model's llava-hf directory is the pyfunc artifact `llava_hf`, at `artifacts/llava_hf/` inside
the MLflow Model, where plain transformers and vLLM read it directly. Its `llava_metadata.json`
(written at export by `llava.model.metadata`) says how images are prepared and which tokens end a
turn; versions exported before that file existed fall back to the processor and generation config.

Input, one row per request, OpenAI chat format:
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "What shape?"},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
     "max_tokens": 32, "temperature": 0.0}
Output, one dict per request: {"text", "finish_reason" ("stop" | "length"), "usage"}.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

LLAVA_HF_ARTIFACT = "llava_hf"
METADATA_FILE = "llava_metadata.json"
DEFAULT_MAX_TOKENS = 256
# Decoded data URLs above this are refused before Pillow sees them (a request is not a file store).
MAX_IMAGE_BYTES = 20 * 1024 * 1024


class ChatRequestError(ValueError):
    """A request the model cannot answer (bad message structure, unsupported image URL...)."""


def decode_data_url(url: str) -> Any:
    """A `data:image/...;base64,...` URL as an RGB PIL image (transparency flattened onto white)."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:"):
        raise ChatRequestError("image_url.url must be a data URL (data:image/...;base64,...); "
                               "this model does not fetch remote images")
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header or not header[5:].startswith("image/"):
        raise ChatRequestError(f"image_url.url: expected data:image/<type>;base64,<data>, got {header[:40]!r}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ChatRequestError("image_url.url: the base64 data does not decode") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ChatRequestError(f"image_url.url: image of {len(raw)} bytes exceeds {MAX_IMAGE_BYTES}")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (OSError, ValueError) as err:
        raise ChatRequestError(f"image_url.url: not a readable image ({err})") from None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def prepare_image(img: Any, image_processor: Any, image_mode: str) -> Any:
    """`pad`: pad to square with the processor's mean colour, then resize (LLaVA-1.5); `resize`: as is."""
    from PIL import Image

    if image_mode == "resize":
        return img
    if image_mode != "pad":
        raise ValueError(f"image mode must be 'pad' or 'resize', got {image_mode!r}")
    fill = tuple(int(round(255 * m)) for m in image_processor.image_mean)
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    size = (crop["width"], crop["height"]) if "height" in crop else (crop["shortest_edge"],) * 2
    return img.resize(size, Image.BICUBIC)


def split_images(messages: Any) -> tuple[list[dict], list[Any]]:
    """Messages for the chat template (image parts reduced to {"type": "image"}) and their images in order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatRequestError("messages must be a non-empty list")
    out: list[dict] = []
    images: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ChatRequestError(f"messages[{i}] must be an object with a string 'role'")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": msg["role"], "content": content or ""})
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text") or "")})
            elif kind == "image_url":
                image_url = part.get("image_url") or {}
                images.append(decode_data_url(image_url.get("url") if isinstance(image_url, dict) else image_url))
                parts.append({"type": "image"})
            else:
                raise ChatRequestError(f"messages[{i}].content[{j}]: type must be 'text' or 'image_url', got {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out, images


def request_rows(model_input: Any) -> list[dict]:
    """The requests in whatever shape pyfunc hands over: a DataFrame, one dict, or a list of dicts."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    else:
        rows = list(model_input)
    return [_plain(row) for row in rows]


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (what a DataFrame holds after schema enforcement) as lists and Python values."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: an absent DataFrame cell


class LlavaChatModel(PythonModel):
    """Greedy or sampled chat completion over the llava-hf artifact, one request at a time."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = context.artifacts[LLAVA_HF_ARTIFACT]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        meta_path = os.path.join(path, METADATA_FILE)
        meta = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        self.image_mode = meta.get("image_mode", "pad")
        eos = meta.get("stop_token_ids") or self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        self.stop_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [self._answer(row, params or {}) for row in request_rows(model_input)]

    def _answer(self, row: dict, params: dict[str, Any]) -> dict[str, Any]:
        import torch

        messages, images = split_images(row.get("messages"))
        max_tokens = row.get("max_tokens")
        max_tokens = int(params.get("max_tokens", DEFAULT_MAX_TOKENS) if _missing(max_tokens) else max_tokens)
        temperature = row.get("temperature")
        temperature = float(params.get("temperature", 0.0) if _missing(temperature) else temperature)
        if max_tokens < 1 or temperature < 0:
            raise ChatRequestError("max_tokens must be >= 1 and temperature >= 0")
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pixels = [prepare_image(img, self.processor.image_processor, self.image_mode) for img in images]
        inputs = self.processor(text=[text], images=pixels or None, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=pad if pad is not None else self.stop_ids[0], **sampling)
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        if stopped:
            new.pop()
        answer = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        completion = len(out[0]) - prompt_len
        return {"text": answer.strip(), "finish_reason": "stop" if stopped else "length",
                "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                          "total_tokens": prompt_len + completion}}


# Models from code: MLflow runs this file at load time and takes the model set here. Importing
# the module elsewhere (the tests) only sets MLflow's module-level slot, which nothing else reads.
mlflow.models.set_model(LlavaChatModel())
