"""Content-addressed image storage under a media root.

An image is stored once, at `<root>/<sha[:2]>/<sha>.<ext>`, whatever name it came with; the
database keeps the path relative to the root. Every image is opened and fully decoded before it is
accepted, so a truncated or fake file is refused at import time, not in the annotator's browser.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


class BadImage(ValueError):
    pass


@dataclass(frozen=True)
class CheckedImage:
    """An image that decoded cleanly, ready to be stored."""

    data: bytes
    sha256: str
    ext: str
    width: int
    height: int

    @property
    def rel_path(self) -> str:
        return f"{self.sha256[:2]}/{self.sha256}.{self.ext}"


def check_image_bytes(data: bytes) -> CheckedImage:
    """Decode `data` fully; raise BadImage with the reason if it is not a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.load()
                width, height = img.size
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise BadImage(f"cannot decode image ({type(e).__name__}: {e})") from None
    if fmt not in FORMAT_EXT:
        raise BadImage(f"unsupported image format {fmt}; use one of {', '.join(FORMAT_EXT)}")
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), FORMAT_EXT[fmt], width, height)


def check_image_file(path: Path) -> CheckedImage:
    if not path.is_file():
        raise BadImage(f"image not found: {path}")
    return check_image_bytes(path.read_bytes())


def store(root: Path, image: CheckedImage) -> bool:
    """Write `image` under `root` unless it is there already. Returns True if a file was created."""
    dest = root / image.rel_path
    if dest.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(image.data)
    os.replace(tmp, dest)
    return True
