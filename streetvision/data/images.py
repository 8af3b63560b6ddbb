"""Image decoding for large phone JPEGs: reduced-size JPEG decoding, then EXIF orientation."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

# The most pixels one image may decode to: a 48-megapixel photo. JPEGs shrink while decoding (``draft``)
# and pass at any size; other formats decode in full, and a 12000x12000 PNG would take seconds and 400 MB.
MAX_DECODED_PIXELS = 48_000_000


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode ``path`` as RGB, honouring EXIF orientation.

    With ``min_side``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose result still has
    both sides >= ``min_side``: a 4032x3024 photo for a 224-pixel model decodes at 504x378, not in full.
    """
    with Image.open(path) as im:
        if min_side:
            w, h = im.size
            scale = min_side / min(w, h)
            im.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        if im.size[0] * im.size[1] > MAX_DECODED_PIXELS:  # what would be decoded in full: refused unread
            raise Image.DecompressionBombError(
                f"{path}: {im.size[0]}x{im.size[1]} pixels to decode, more than {MAX_DECODED_PIXELS:,}"
            )
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
