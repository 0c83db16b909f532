"""Pictures in and out: grids, PNGs with metadata, and reading a user's image safely."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

# Refuse decompression bombs early (Pillow warns at 89 MP and raises at twice that).
MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be read or written. Its message is one line, for the user."""


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 picture, `cols` per row (default: near square)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + k * (w + pad):pad + k * (w + pad) + w] = im
    return out


def save_png(path: str, image: np.ndarray, metadata: dict[str, str] | None = None,
             scale: int = 1):
    """Writes `image` (uint8 [H, W, 3]) with text chunks; the file appears whole or not at all."""
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_itxt(k, str(v))
    picture = Image.fromarray(np.asarray(image, np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        picture.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ImageError(f"cannot write {path}: {e.strerror or e}") from e


def load_image(path: str, size: int) -> np.ndarray:
    """A user's picture as uint8 [size, size, 3]: EXIF rotation applied, any mode converted to
    RGB (transparency over white), centre-cropped to a square and resized. Raises ImageError."""
    if not os.path.isfile(path):
        raise ImageError(f"no such image file: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path} is {im.width}x{im.height}, larger than we read")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.mode == "I;16" or im.mode.startswith("I"):
                im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((size, size), Image.BOX if side >= size else Image.BICUBIC)
            return np.asarray(im, np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageError(f"cannot read {path} as an image: {str(e).splitlines()[0][:200]}") from e
