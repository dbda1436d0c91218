"""Image loading and the LLaVA-1.5 pre-processing: RGB, pad to square with the mean colour, resize."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

ImageMode = Literal["pad", "resize"]

# Decompression-bomb guard: 64 MP is far above any training resolution.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated, empty or too large."""


def open_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully (truncation shows only on load), check size, return RGB."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if img.width * img.height > max_pixels:
            raise ImageError(f"too_large: {img.width}x{img.height} exceeds {max_pixels} pixels")
        img.load()
    except ImageError:
        raise
    except FileNotFoundError as err:
        raise ImageError(f"missing: {err.filename}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"corrupt: {err}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError("empty: zero-sized image")
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Flatten alpha onto white (transparent PNG backgrounds would otherwise turn black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    return tuple(int(round(255 * m)) for m in image_processor.image_mean)


def target_size(image_processor) -> tuple[int, int]:
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    if "height" in crop:
        return crop["width"], crop["height"]
    side = crop["shortest_edge"]
    return side, side


def prepare_image(img: Image.Image, image_processor, mode: ImageMode = "pad") -> Image.Image:
    """`pad` (LLaVA-1.5): pad to square with the processor's mean colour, then resize to the
    processor's input size, so the later resize/centre-crop keeps the whole image.
    `resize`: leave the image as is; the processor's own resize + centre crop apply."""
    if mode == "resize":
        return img
    if mode != "pad":
        raise ValueError(f"image mode must be 'pad' or 'resize', got {mode!r}")
    square = pad_to_square(img, mean_colour(image_processor))
    return square.resize(target_size(image_processor), Image.BICUBIC)
