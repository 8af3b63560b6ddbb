"""Image decoding for large phone JPEGs: reduced-size JPEG decoding, then EXIF orientation."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


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
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
