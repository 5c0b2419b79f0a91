"""Images in preference rows (TRL's vision preference format): checked up front, decoded on demand.

A row's images come from an `images` list or a one-image `image` field; its conversational prompt
marks where each goes with a `{"type": "image"}` part in a user turn's list-valued `content`. An
image value is a file path (relative to the data file's folder, or absolute), a PIL image (from a
`datasets` Image column or in-memory rows), `{"bytes": b"...", "path": ...}` (`datasets`' encoded
form, as Parquet holds it) or `{"path": ...}`. URLs are refused: directpo reads data offline.

Each image becomes an `ImageRef`: where the image is plus its size, read from the header alone
(`PIL.Image.open` is lazy; `verify()` checks the file's structure without decoding pixels). A data
set of 50k rows thus holds 50k small references, not 50k decoded images; `ImageRef.open()` decodes
one when a model needs it. Every problem is a one-line `DataError` naming file, row and field
("images[1]"), with a `kind` that the skip report counts.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import DataError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:", re.ASCII)


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a file (`path`), encoded bytes (`data`) or an in-memory PIL image (`pil`),
    with its size from the header. `nbytes`: the encoded size, None for an in-memory PIL image."""

    width: int
    height: int
    path: str | None = None
    data: bytes | None = None
    pil: Any = None
    format: str | None = None
    nbytes: int | None = None

    def open(self):
        """The decoded PIL image (read from the file or bytes now; the row only holds a reference)."""
        from PIL import Image

        if self.pil is not None:
            return self.pil
        img = Image.open(self.path if self.data is None else io.BytesIO(self.data))
        img.load()
        return img


def is_placeholder(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list (image parts skipped)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def check_parts(content: Any, source: str, row: int, name: str) -> None:
    """A list-valued content must be parts {"type": "text", "text": str} or {"type": "image"}."""
    if not content:
        raise DataError(source, row, name, "an empty list of content parts", kind="type")
    for k, part in enumerate(content):
        ok = isinstance(part, dict) and (is_placeholder(part) or (part.get("type") == "text"
                                                                  and isinstance(part.get("text"), str)))
        if not ok:
            raise DataError(source, row, f"{name}[{k}]", "expected a content part {\"type\": \"text\", \"text\": "
                                                         "str} or {\"type\": \"image\"}", kind="type")


def placeholders(messages: Any, source: str, row: int, name: str) -> int:
    """How many image placeholders the user turns of `messages` hold; one in another turn (an
    assistant's) is a DataError: a model reads images, it does not write them."""
    if not isinstance(messages, list):
        return 0
    n = 0
    for j, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        count = sum(map(is_placeholder, content))
        if count and m.get("role") != "user":
            raise DataError(source, row, f"{name}[{j}]", f"an image placeholder in a {m.get('role')!r} turn: images "
                                                         "go in user turns of the prompt", kind="image_placeholder")
        n += count
    return n


def flatten(messages: Any) -> Any:
    """`messages` with every list-valued content joined to its text (for turns without images)."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "content": content_text(m["content"])} if isinstance(m.get("content"), list) else m
            for m in messages]


def image_values(rec: dict, source: str, row: int) -> tuple[str, list]:
    """(field name, the row's image values): from `images` (a list) or `image` (one image)."""
    if "images" in rec and "image" in rec:
        raise DataError(source, row, "image", "give 'images' (a list) or 'image' (one), not both", kind="type")
    if "image" in rec:
        return "image", [rec["image"]]
    values = rec.get("images", [])
    if not isinstance(values, (list, tuple)):
        raise DataError(source, row, "images", f"expected a list of images, got {type(values).__name__}",
                        kind="type")
    return "images", list(values)


def base_dir(source: str) -> str | None:
    """The folder relative image paths are read from: the data file's, a `datasets` directory
    itself, or (in-memory rows, hub ids) the working directory (None)."""
    if type(source) is not str:  # a `Rows` (str subclass): its name is not a path
        return None
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return os.path.abspath(path) if os.path.isdir(path) else None


def image_ref(value: Any, base: str | None, source: str, row: int, name: str) -> ImageRef:
    """Check one image value (existence, header, size) and return its reference; or a DataError."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(source, row, name, f"'bytes' must be bytes, got {type(data).__name__}", kind="type")
        return _probe(None, bytes(data), source, row, name)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if isinstance(value, str):
        if URL.match(value):
            raise DataError(source, row, name, f"a URL ({value[:60]}): directpo reads data offline; download the "
                                               "image first and give its file path", kind="image_url")
        path = os.path.expanduser(value)
        if not os.path.isabs(path) and base is not None:
            path = os.path.join(base, path)
        if not os.path.isfile(path):
            raise DataError(source, row, name, f"no such image file: {path}", kind="image_missing")
        return _probe(path, None, source, row, name)
    if _is_pil(value):
        width, height = value.size
        if width == 0 or height == 0:
            raise DataError(source, row, name, f"an empty image ({width}×{height})", kind="image_empty")
        return ImageRef(width, height, pil=value, format=value.format)
    raise DataError(source, row, name, "expected an image: a file path, a PIL image, {\"bytes\": ...} or {\"path\": "
                                       f"...}}, got {type(value).__name__}", kind="type")


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # no PIL: nothing can be a PIL image
        return False
    return isinstance(value, Image.Image)


def _probe(path: str | None, data: bytes | None, source: str, row: int, name: str) -> ImageRef:
    """The reference of an encoded image after a header read and `verify()` (no pixels decoded)."""
    from ..errors import MissingPackageError

    try:
        from PIL import Image
    except ImportError:
        raise MissingPackageError("images in the data need Pillow: pip install pillow") from None
    nbytes = os.path.getsize(path) if path is not None else len(data)
    if nbytes == 0:
        raise DataError(source, row, name, "an empty image (0 bytes)" + (f": {path}" if path else ""),
                        kind="image_empty")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            (width, height), fmt = img.size, img.format
            img.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; each is this row's error
        what = f"{path}: " if path else ""
        raise DataError(source, row, name, f"not a readable image: {what}{type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''}"[:200],
                        kind="image_unreadable") from None
    if width == 0 or height == 0:
        raise DataError(source, row, name, f"an empty image ({width}×{height})", kind="image_empty")
    return ImageRef(width, height, path=path, data=data, format=fmt, nbytes=nbytes)
