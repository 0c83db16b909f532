"""Pictures in and out: grids, PNGs with metadata, and reading an image safely (a user's file
or a dataset member's bytes), whatever its mode, orientation or state of repair."""

from __future__ import annotations

import io
import math
import os
import struct

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

# Refuse decompression bombs early (Pillow warns at 89 MP and raises at twice that).
MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be read or written. Its message is one line, for the user."""


class EmptyImageError(ImageError):
    """A zero-byte image file."""


class ImageTooLargeError(ImageError):
    """An image with more than MAX_PIXELS pixels (a decompression bomb, or just too big)."""


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


def box_downsample(images, size: int):
    """Float pictures [..., H, H, C] (NumPy or JAX) -> [..., size, size, C], each output pixel
    the mean of its H/size x H/size block (Pillow's BOX filter at an integer factor: a shapes
    picture rendered at 64 px comes down to its 32 px rendering but for antialiased edges,
    which it averages over more samples). The identity when H == size."""
    h = images.shape[-3]
    if h == size:
        return images
    f = h // size
    if f * size != h or images.shape[-2] != h:
        raise ValueError(f"cannot box-downsample {h}x{images.shape[-2]} px pictures to {size} px: "
                         "the side must be a whole multiple of it")
    lead = images.shape[:-3]
    blocks = images.reshape(*lead, size, f, size, f, images.shape[-1])
    return blocks.mean(axis=(-4, -2))


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
    return square_crop(open_rgb(path), size)


def decode_image(data: bytes, size: int, offset: float = 0.5, name: str = "image") -> np.ndarray:
    """Encoded image bytes (a dataset member) as uint8 [size, size, 3], converted as
    `load_image` does; the square is cut at `offset` along the longer side (0.5: the centre).
    JPEGs are decoded at a reduced scale (DCT scaling) when they are at least twice `size`,
    which makes large photographs several times cheaper to read. Raises ImageError."""
    if not data:
        raise EmptyImageError(f"{name} is empty (0 bytes)")
    return square_crop(open_rgb(io.BytesIO(data), name, draft=size), size, offset)


def open_rgb(source, name: str | None = None, draft: int | None = None) -> Image.Image:
    """A path or binary file as a decoded RGB picture: EXIF rotation applied, transparency
    composited over white, 16-bit scaled to 8, palette/grey/CMYK converted. Pictures over
    MAX_PIXELS are refused before decoding (ImageTooLargeError); anything unreadable or
    truncated is an ImageError. `draft` lets a JPEG decoder shrink by 2, 4 or 8 as long as
    both sides stay at least `draft` pixels."""
    name = name or str(source)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageTooLargeError(f"{name} is {im.width}x{im.height}, larger than we read")
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.mode.startswith("I"):  # 16- and 32-bit integer greys
                im = Image.fromarray(
                    (np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
            im = im.convert("RGB")
            im.load()
            return im
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot read {name} as an image: not a known image format") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name} is too large to read: "
                                 f"{str(e).splitlines()[0][:200]}") from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
            KeyError, ZeroDivisionError) as e:
        # Pillow's plug-ins raise all of these on malformed files (struct.error, IndexError and
        # KeyError from damaged headers and EXIF blocks); none may escape as a traceback.
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ImageError(f"cannot read {name} as an image: {reason}") from e


def square_crop(im: Image.Image, size: int, offset: float = 0.5) -> np.ndarray:
    """The largest square of `im` at `offset` along its longer side (0: left or top, 1: right or
    bottom), resized to uint8 [size, size, 3]. Cropping before resizing equals resizing the
    shorter side to `size` and cropping after, without ever holding the long resized strip."""
    side = min(im.size)
    left = int(round((im.width - side) * offset))
    top = int(round((im.height - side) * offset))
    im = im.crop((left, top, left + side, top + side))
    im = im.resize((size, size), Image.BOX if side >= size else Image.BICUBIC)
    return np.asarray(im, np.uint8)
