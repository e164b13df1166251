"""The one image-opening policy for images that data rows (or a command line) name.

Strangers' data must not make m2pt run foreign decoders, exhaust memory or reach the network, so
every image m2pt opens goes through here:

- formats: only ``ALLOWED_FORMATS`` are identified and decoded (an EPS file named ``.png`` is not
  handed to Ghostscript; it is refused as "image format EPS is not allowed");
- size: the pixel count is read from the header and checked against ``data.max_image_pixels``
  before anything is decoded;
- the network: a path with a URL scheme (``http://``, ``s3://``, ``hf://``, ...) is refused, never
  fetched; embedded bytes win over a path, which is then only a name.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2pt_cli.errors import UserError, quote

if TYPE_CHECKING:
    from collections.abc import Iterator

    from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# 8192 x 8192: a 50 MP phone photo (8160 x 6144) and a 61 MP full-frame one (9504 x 6336) pass, and
# one such image decodes to 192 MiB as RGB. It stays under PIL's own decompression-bomb limit
# (PIL_PIXEL_LIMIT), so PIL's warning or error never fires first for an image the bound allows.
DEFAULT_MAX_PIXELS = 8192 * 8192
PIL_PIXEL_LIMIT = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: it warns above this, raises above twice it
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
REMOTE = (
    "image is a remote reference (URL); m2pt never fetches what a data row names: download it and give a local path"
)
LEAVES_FOLDER = "image path leaves the image folder"
UNREADABLE = "image unreadable"


class _Refused(Exception):
    """An image the policy does not open; the message is the reason (a skip-report line)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


def is_remote(path: str) -> bool:
    """True for a path with a URL scheme (``http://``, ``s3://``, ``hf://``, ``zip://``, ...)."""
    return bool(_URL.match(path))


def leaves_folder(path: str) -> bool:
    """True for an absolute path or one that climbs out with ``..`` (the lexical half of
    ``in_folder``)."""
    if os.path.isabs(path):
        return True
    return os.path.normpath(path).split(os.sep)[0] == os.pardir


def in_folder(name: str, folders: tuple[Path, ...], absolute: bool = False) -> str | None:
    """The one rule for an image that a data file names (training or bench data): its path when it
    lies inside one of ``folders``, else None.

    A relative ``name`` is looked up in ``folders[0]`` and may not climb out with ``..``: the check
    is on the name as written, so symbolic links inside the folder are followed (clusters link
    image folders such as ``coco/`` to shared storage; the folder's links are its owner's, the data
    file only names paths). An absolute ``name`` is refused unless ``absolute`` (data that a library
    downloaded names the files it keeps in its cache, one of ``folders``), and then it must resolve
    inside one of ``folders``.
    """
    if not os.path.isabs(name):
        return None if leaves_folder(name) else str(Path(folders[0]) / name)
    if not absolute:
        return None
    real = os.path.realpath(name)
    for folder in folders:
        root = os.path.realpath(folder)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return name
    return None


def _over(max_pixels: int) -> str:
    return f"image has more pixels than data.max_image_pixels allows ({max_pixels})"


def _other_format(prefix: bytes) -> str | None:
    """The name of a format PIL knows but m2pt does not open, from its magic bytes (byte tests only)."""
    from PIL import Image

    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in ALLOWED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: BLE001, S112 - a magic-byte test that trips on odd input is no match
            continue
    return None


@contextmanager
def _opened(ref: Any, max_pixels: int) -> Iterator[Image.Image]:
    """The image's header, opened lazily (pixels not decoded), or ``_Refused`` saying why not."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, str):
        ref = {"bytes": None, "path": ref}
    data, path = ref.get("bytes"), ref.get("path")
    if not data and ref.get("refused"):  # a data file's path outside its folder (``in_folder``)
        raise _Refused(f"{ref['refused']} ({quote(path)})")
    if data:
        source: Any = io.BytesIO(data)
        prefix = bytes(data[:16])
    elif path:
        if is_remote(path):
            raise _Refused(REMOTE)
        if Path(path).is_dir():
            raise _Refused("image path is a folder")
        if not Path(path).is_file():
            raise _Refused("image path is not a regular file" if Path(path).exists() else "image file missing")
        source = path
        prefix = b""
    else:
        raise _Refused("image without bytes or path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Refused(_over(max_pixels)) from None
    except UnidentifiedImageError as exc:
        if not prefix:
            try:
                with open(path, "rb") as handle:
                    prefix = handle.read(16)
            except OSError as exc2:
                raise _Refused(UNREADABLE, str(exc2)) from None
        other = _other_format(prefix)
        if other:
            raise _Refused(f"image format {other} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        raise _Refused(UNREADABLE, str(exc)) from None
    except (OSError, ValueError) as exc:
        raise _Refused(UNREADABLE, str(exc)) from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise _Refused(_over(max_pixels))
        yield img


FIT_MARGIN = 2  # an image reduced for a model keeps at least twice its input size on each side


def _reduced(img: Image.Image, fit: tuple[int, int]) -> Image.Image:
    """``img`` as RGB, at least ``FIT_MARGIN`` times ``fit`` on each side where it was larger."""
    factor = min(img.width // (FIT_MARGIN * fit[0]), img.height // (FIT_MARGIN * fit[1]))
    if factor < 2:
        return img.convert("RGB")
    if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, never below the size kept
        img.draft("RGB", (img.width // factor, img.height // factor))
        factor = min(img.width // (FIT_MARGIN * fit[0]), img.height // (FIT_MARGIN * fit[1]))
    if factor < 2:
        return img.convert("RGB")
    img.load()
    return (img if img.mode == "RGB" else img.convert("RGB")).reduce(factor)  # no full-size copy of an RGB image


def image_problem(ref: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """'' if ``ref`` (a path, or ``{bytes, path}``, or None) passes the policy from its header, else why not.

    Only the header is read (data preparation checks every record); a file that is damaged further
    on fails later, in ``open_image``.
    """
    if ref is None:
        return ""
    try:
        with _opened(ref, max_pixels):
            return ""
    except _Refused as refused:
        return str(refused)


def header_pixels(ref: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The pixel count an image's header declares (0 when the policy refuses it: ``open_image`` says why)."""
    try:
        with _opened(ref, max_pixels) as img:
            return img.width * img.height
    except _Refused:
        return 0


def open_image(
    ref: dict[str, Any], record_id: str, max_pixels: int = DEFAULT_MAX_PIXELS, fit: tuple[int, int] | None = None
) -> Image.Image:
    """Open an image reference (``{bytes, path}``) as RGB under the policy.

    Args:
        max_pixels: the recipe's ``data.max_image_pixels`` where the caller has the recipe.
        fit: (width, height) the image is wanted at (a model's input size), or None for full size.
            An image over ``FIT_MARGIN`` times it on both sides is decoded smaller: a JPEG at a
            reduced DCT scale, then an integer box reduction that keeps at least ``FIT_MARGIN``
            times ``fit``, so a 64-megapixel upload ends up a fraction of a megabyte.
    Raises:
        UserError: ``record <id>: <reason>`` for an image the policy refuses, or a truncated or
            unreadable one.
    """
    try:
        with _opened(ref, max_pixels) as img:
            if fit is None:
                return img.convert("RGB")
            return _reduced(img, fit)
    except _Refused as refused:
        if refused.detail:  # damaged or not an image at all
            raise UserError(f"record {quote(record_id, bare=True)}: cannot read its image ({refused.detail})") from None
        raise UserError(f"record {quote(record_id, bare=True)}: {refused}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"record {quote(record_id, bare=True)}: cannot read its image ({exc})") from None
