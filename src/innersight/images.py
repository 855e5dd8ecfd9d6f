"""Load user images into fully decoded RGB ``PIL.Image.Image`` objects, or say clearly why not.

Images reach innersight as paths (CLI, evaluation data), raw bytes, binary file objects or PIL
images. :func:`load_image` turns each into a plain RGB image that the processors of every
supported model accept, and turns every problem into an :class:`~innersight.errors.ImageError`
whose one-line message names the image and the problem:

* the file is missing, is a directory or another non-regular file (a named pipe would block the
  read forever), is a URL (not fetched), is empty, is not an image, or its data is truncated or
  corrupt (the pixels are decoded eagerly, so a cut-off file fails here and not later as grey
  pixels inside the model);
* the header claims more pixels than :data:`MAX_PIXELS` (or than Pillow's own
  ``PIL.Image.MAX_IMAGE_PIXELS`` guard): rejected before any pixel memory is allocated.

Conversions (see :func:`ensure_rgb`): transparent pixels are composited over white, 16-bit and
32-bit grey images are scaled to 8 bits instead of clipped, CMYK/YCbCr/LAB/HSV go through
Pillow's conversions. The EXIF orientation of photos is applied, and of a multi-frame file
(animated GIF/WebP/PNG, multi-page TIFF) the first frame is used.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Final

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

__all__ = ["MAX_PIXELS", "ImageSource", "ensure_rgb", "load_image", "load_images"]

MAX_PIXELS: Final[int] = 178_956_970
"""Hard ceiling on width x height of any image :func:`load_image` decodes (twice Pillow's default
``MAX_IMAGE_PIXELS``). Pillow's own guard applies as well and is stricter by default: an image
above ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485) makes Pillow warn, and that warning is turned
into an :class:`~innersight.errors.ImageError` too. Raise or disable Pillow's limit
(``PIL.Image.MAX_IMAGE_PIXELS = None``) to load images up to this ceiling."""

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image
"""Anything :func:`load_image` accepts."""

# Modes whose pixels carry an alpha channel (premultiplied ones included).
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Single-channel modes with more than 8 bits per pixel, scaled to 8 bits by _to_uint8_gray.
_WIDE_GRAY_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# EXIF orientation value -> the transposition that shows the picture upright.
_ORIENTATION_FIX: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG: Final[int] = 0x0112


def load_image(source: ImageSource, *, max_pixels: int | None = None) -> Image.Image:
    """Open ``source`` and return it as a new, fully decoded RGB image, upright per its EXIF data.

    Args:
        source: a path (``str`` or ``os.PathLike``), the encoded bytes of an image file
            (``bytes``, ``bytearray``, ``memoryview``), a binary file object (``open(p, "rb")``,
            ``io.BytesIO``; it is read from its start and left open), or a ``PIL.Image.Image``
            (converted with :func:`ensure_rgb`, then turned upright per its EXIF orientation; the
            caller's image is not modified).
        max_pixels: largest accepted width x height; ``None`` means :data:`MAX_PIXELS`.

    Returns:
        A plain ``PIL.Image.Image`` in mode ``"RGB"``, not tied to any open file.

    Raises:
        ImageError: for every source that cannot be turned into an image, with a one-line
            message naming the source and the problem.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise ValueError(f"max_pixels must be positive, got {limit}")
    if isinstance(source, Image.Image):
        name = _pil_name(source)
        _check_size(source.size, name, limit)
        rgb = _ensure_rgb(source, name)  # decodes a lazily opened image first
        return _apply_orientation(rgb, _orientation(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = os.fsdecode(source)  # as given: Path() would fold the "//" of a URL
        _check_path(path, name)
        return _decode(path, name, limit)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes of image data>"
        if not data:
            raise ImageError(f"{name}: no data (the image is empty)")
        return _decode(io.BytesIO(data), name, limit)
    if isinstance(source, io.TextIOBase):
        name = _stream_name(source)
        raise ImageError(f"{name}: file object is open in text mode; open image files with mode 'rb'")
    if hasattr(source, "read"):
        return _decode(source, _stream_name(source), limit)
    raise ImageError(
        f"<{type(source).__name__}>: not an image source; expected a file path, image bytes, "
        "a binary file object or a PIL image"
    )


def load_images(sources: Iterable[ImageSource], *, max_pixels: int | None = None) -> list[Image.Image]:
    """:func:`load_image` for each of ``sources``, in order; the first bad one raises ImageError.

    A single path, bytes object or PIL image is refused with ``TypeError`` rather than iterated
    over character by character: wrap it in a list.
    """
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        raise TypeError(
            f"load_images takes a list of image sources, got a single {type(sources).__name__}; "
            "use load_image or wrap it in a list"
        )
    return [load_image(source, max_pixels=max_pixels) for source in sources]


def ensure_rgb(image: Image.Image) -> Image.Image:
    """A new RGB copy of ``image``; the input is left untouched, whatever its mode.

    * ``RGB``: copied.
    * alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) or a ``transparency`` entry
      in ``image.info`` (palette and grey/RGB PNGs with a tRNS chunk): composited over white.
    * ``I;16*`` (16-bit grey): scaled by 255/65535, rounded, so 65535 -> 255 and 257 -> 1.
    * ``I`` (32-bit int) and ``F`` (float) have no fixed range; the values decide:
      all within 0..255 -> used as 8-bit values; ``I`` within 0..65535 -> scaled as 16-bit;
      ``F`` within 0..1 -> scaled by 255; anything else -> stretched linearly from its minimum
      (0) to its maximum (255). Non-finite floats become 0.
    * everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``, ...):
      Pillow's own conversion to RGB.

    EXIF orientation is *not* applied here; :func:`load_image` does that.

    Raises:
        ImageError: ``image`` is not a PIL image, has no pixels, or its (lazily loaded) data
            cannot be decoded or converted.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"<{type(image).__name__}>: not a PIL image")
    return _ensure_rgb(image, _pil_name(image))


def _ensure_rgb(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    mode = image.mode
    try:
        if mode in _WIDE_GRAY_MODES:
            return Image.fromarray(_to_uint8_gray(image), mode="L").convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _composite_over_white(image.convert("RGBA"))
        if mode == "RGB":
            return image.copy()
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for bad pixel data; report them all alike
        raise ImageError(
            f"{name}: cannot decode or convert the {mode} image to RGB ({_one_line(exc)})"
        ) from exc


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    """``rgba`` (mode RGBA) over an opaque white background, as RGB."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8_gray(image: Image.Image) -> np.ndarray:
    """8-bit grey pixels of a 16-bit, 32-bit-int or float single-channel image, ``[H, W]`` uint8."""
    values = np.asarray(image)  # [H, W] uint16 (either byte order), int32 or float32
    if image.mode.startswith("I;16"):
        wide = values.astype(np.uint32)  # [H, W]
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    floats = values.astype(np.float64)  # [H, W]
    finite = np.isfinite(floats)
    floats = np.where(finite, floats, 0.0)
    if not finite.any():
        return np.zeros(floats.shape, dtype=np.uint8)
    low, high = float(floats.min()), float(floats.max())
    if low >= 0.0 and high <= 1.0 and image.mode == "F":
        scaled = floats * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = floats
    elif low >= 0.0 and high <= 65535.0 and image.mode == "I":
        scaled = floats * (255.0 / 65535.0)
    elif high > low:
        scaled = (floats - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(floats)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _decode(target: Path | IO[bytes], name: str, limit: int) -> Image.Image:
    """Open ``target`` with Pillow, check its size, decode frame 0 eagerly and convert it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(target)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: image is too large to decode safely ({_one_line(exc)})") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file, or in a format Pillow cannot read") from exc
        except PermissionError as exc:
            raise ImageError(f"{name}: permission denied") from exc
        except Exception as exc:  # a plugin that recognised the header choked on what followed
            raise ImageError(f"{name}: cannot open image ({_one_line(exc)})") from exc
    with opened:
        _check_size(opened.size, name, limit)
        try:
            # Decode every pixel of frame 0 now, while the file is open. With Pillow's default
            # ImageFile.LOAD_TRUNCATED_IMAGES = False a cut-off file raises here. A caller who set
            # it True opted into padded pixels process-wide; that global is not flipped here, as
            # doing so would race with other threads.
            opened.load()
        except Exception as exc:  # OSError("image file is truncated"), SyntaxError, struct.error, ...
            raise ImageError(f"{name}: image data is truncated or corrupt ({_one_line(exc)})") from exc
        orientation = _orientation(opened)
        rgb = _ensure_rgb(opened, name)
    return _apply_orientation(rgb, orientation)


def _check_path(path: Path, name: str) -> None:
    """Raise ImageError for paths that cannot be an image file, with the specific reason."""
    if not path.exists():
        if name.startswith(("http://", "https://")):
            raise ImageError(f"{name}: URLs are not fetched; download the image and pass the local file")
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    if not path.is_file():  # a named pipe would block the read forever; a device never ends
        raise ImageError(f"{name}: not a regular file (a pipe, socket or device); pass an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({_one_line(exc)})") from exc
    if size == 0 and path.is_file():
        raise ImageError(f"{name}: file is empty")


def _check_size(size: tuple[int, int], name: str, limit: int) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{limit:,} (possible decompression bomb)"
        )


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) of ``image``; 1 when absent, unreadable or out of range."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not make a readable picture unreadable
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_FIX else 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_FIX.get(orientation)
    return image if method is None else image.transpose(method)


def _pil_name(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    return filename if isinstance(filename, str) and filename else "<PIL image>"


def _stream_name(stream: object) -> str:
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) and name else f"<{type(stream).__name__} object>"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
