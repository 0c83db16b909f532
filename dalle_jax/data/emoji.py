"""The emoji corpus: every emoji of the Noto Color Emoji font, drawn on a plain background and
captioned with its name, written as tar shards with a fixed held-out split.

    python -m dalle_jax.data.emoji OUT_DIR [--size 64] [--background white] [--eval-percent 10]

writes `OUT_DIR/train/*.tar` and `OUT_DIR/eval/*.tar` (the format of `dalle_jax.data.shards`),
ready for `data.name=shards data.path=OUT_DIR/train`.

Facts this rests on: the font is Debian's `fonts-noto-color-emoji`
(/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf, bitmap glyphs 136 x 128 px); Pillow draws
it only at its native size 109 with `embedded_color=True`, so pictures are drawn there and then
resized. A missing glyph draws nothing. Names come from the `emoji` package (CLDR short names,
fully-qualified sequences: ZWJ sequences, skin tones and flags included) where it is installed,
else from `unicodedata` for single code points. An emoji is held out when the CRC-32 of its
name falls in the lowest `eval_percent` of a hundred: a split fixed by the name alone, so
that it survives new font versions and new emoji.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import unicodedata
import zlib

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from dalle_jax.data.files import DataError
from dalle_jax.data.shards import ShardWriter

FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
              "/System/Library/Fonts/Apple Color Emoji.ttc")
NATIVE_SIZE = 109  # the only size the font's bitmaps are drawn at
GLYPH_WIDTH = 136
# Code point ranges holding single-code-point emoji (for the unicodedata fallback).
EMOJI_RANGES = ((0x203C, 0x3299), (0x1F000, 0x1FAFF))
_VS16 = "\ufe0f"


def find_font(path: str | None = None) -> str:
    for candidate in ([path] if path else FONT_PATHS):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise DataError(f"Noto Color Emoji not found ({path or ', '.join(FONT_PATHS[:1])}); "
                    "install it: apt-get install fonts-noto-color-emoji")


def load_font(path: str | None = None) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(find_font(path), NATIVE_SIZE)
    except OSError as e:
        raise DataError(f"cannot load the emoji font {find_font(path)}: {e}") from e


def _is_flag(sequence: str) -> bool:
    return len(sequence) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence)


def candidates(rich_names: bool = True) -> list[tuple[str, str]]:
    """(sequence, name) of every emoji to try, sorted by sequence. With the `emoji` package
    (and `rich_names`), its fully-qualified emoji under their CLDR names; otherwise single
    code points named by unicodedata."""
    if rich_names:
        try:
            import emoji as emoji_package
        except ImportError:
            emoji_package = None
        if emoji_package is not None:
            out = []
            for sequence, data in emoji_package.EMOJI_DATA.items():
                if data.get("status") != emoji_package.STATUS["fully_qualified"]:
                    continue
                name = data["en"].strip(":").replace("_", " ")
                out.append((sequence, f"flag of {name}" if _is_flag(sequence) else name))
            return sorted(out)
    out = []
    for lo, hi in EMOJI_RANGES:
        for code in range(lo, hi + 1):
            char = chr(code)
            name = unicodedata.name(char, "")
            if name and unicodedata.category(char) == "So":
                out.append((char, name.lower()))
    return out


def draw(font: ImageFont.FreeTypeFont, sequence: str, size: int,
         background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray | None:
    """The emoji centred on a square `background`, uint8 [size, size, 3]; None when the font
    has no single glyph for it (nothing drawn, or a sequence that falls apart into several)."""
    left, top, right, bottom = font.getbbox(sequence)
    if right - left > GLYPH_WIDTH:
        return None
    canvas = Image.new("RGBA", (GLYPH_WIDTH + 16, GLYPH_WIDTH + 16), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), sequence, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = int(max(glyph.size) * 1.15)  # a margin of 7.5% each side
    square = Image.new("RGBA", (side, side), background + (255,))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return np.asarray(square.convert("RGB").resize((size, size), Image.LANCZOS), np.uint8)


def is_held_out(name: str, eval_percent: int) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 100 < eval_percent


def write_corpus(out_dir: str, size: int = 64, background: str = "white",
                 eval_percent: int = 10, per_shard: int = 1000, font_path: str | None = None,
                 rich_names: bool = True, limit: int | None = None) -> dict[str, int]:
    """Renders and writes the corpus; returns the number written per split (and `missing`:
    emoji the font could not draw as one glyph)."""
    font = load_font(font_path)
    try:
        colour = ImageColor.getrgb(background)[:3]
    except ValueError as e:
        raise DataError(f"unknown background colour {background!r}") from e
    writers = {split: ShardWriter(os.path.join(out_dir, split), per_shard)
               for split in ("train", "eval")}
    counts = {"train": 0, "eval": 0, "missing": 0}
    for sequence, name in candidates(rich_names)[:limit]:
        picture = draw(font, sequence, size, colour)
        if picture is None:
            counts["missing"] += 1
            continue
        split = "eval" if is_held_out(name, eval_percent) else "train"
        out = io.BytesIO()
        Image.fromarray(picture).save(out, format="PNG")
        writers[split].add(out.getvalue(), "png", name, {
            "emoji": sequence, "codepoints": " ".join(f"U+{ord(c):04X}" for c in sequence),
            "split": split, "width": size, "height": size})
        counts[split] += 1
    for writer in writers.values():
        writer.close()
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_jax.data.emoji",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--background", default="white", help="a colour name or #rrggbb")
    parser.add_argument("--eval-percent", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--font", default=None, help="path of NotoColorEmoji.ttf")
    parser.add_argument("--unicode-names", action="store_true",
                        help="name single code points by unicodedata even if `emoji` is there")
    args = parser.parse_args(argv)
    try:
        counts = write_corpus(args.out_dir, args.size, args.background, args.eval_percent,
                              args.per_shard, args.font, not args.unicode_names)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train and {counts['eval']} eval emoji to {args.out_dir} "
          f"({counts['missing']} not in the font)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
