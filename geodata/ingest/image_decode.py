"""Decode photos: image bytes to RGB with a pixel cap, EXIF orientation and alpha on white.

- `decode_image` decodes bytes fully (the ingest's decode check, the service's uploads);
  `open_photo` reads one photo file first (capped, regular files only);
- `to_rgb` turns any PIL mode into RGB;
- `expand_photo_paths` turns the files and folders given to the predict tool into photo files.

Images with more than `max_image_pixels` pixels (DEFAULT_MAX_IMAGE_PIXELS) raise PIL's
DecompressionBombError before any pixel is decoded; bytes over `max_image_bytes` raise
geodata.capped_io.InputTooLargeError before anything is decoded.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from geodata.capped_io import MAX_IMAGE_BYTES, InputError, check_size, path_refusal, read_capped

log = logging.getLogger(__name__)

#: Default pixel limit per image. OSV-5M photos are 512 px tall and at most ~1.2k wide
#: (<1 Mpx); 40 Mpx leaves room for other datasets while refusing decompression bombs
#: far below PIL's own 89 Mpx warning / 179 Mpx error thresholds.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(InputError):
    """An image that cannot be read or fully decoded (truncated, corrupt, not an image)."""


def decode_image(
    data: bytes, where: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Decode image bytes fully; return RGB with EXIF orientation applied.

    Raises InputTooLargeError when ``data`` is over ``max_image_bytes`` (nothing decoded),
    PIL.Image.DecompressionBombError above ``max_image_pixels`` (checked from the
    header, before any pixel is decoded) and ImageDecodeError (an OSError) when the data
    is truncated, corrupt or not an image; messages start with ``where``.
    """
    check_size(len(data), max_image_bytes, where)
    try:
        image = Image.open(io.BytesIO(data))
        n_pixels = image.width * image.height
        if n_pixels > max_image_pixels:
            raise Image.DecompressionBombError(
                f"{where}: {image.width}x{image.height} = {n_pixels} pixels exceeds "
                f"max_image_pixels={max_image_pixels} (possible decompression bomb); "
                "raise the limit only for trusted data"
            )
        image.load()  # full decode: truncated data raises here, not later in a worker
        return to_rgb(image)
    except Image.DecompressionBombError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        # PIL names an in-memory file by its repr ('<_io.BytesIO object at 0x...>'): say what it means
        detail = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        reason = f"{type(exc).__name__}: {detail}"
        raise ImageDecodeError(
            f"{where}: cannot decode image ({reason}); the file is truncated, corrupt or not an image", reason
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as RGB: EXIF orientation applied, alpha composited on white.

    Handles L/LA/P/PA/RGBA/CMYK/I;16/... modes. Palette images with transparency go
    through RGBA so the transparent colour becomes white rather than its palette colour.
    """
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # malformed EXIF is not a broken photo: keep it unrotated
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit greyscale: convert("RGB") would clip, so scale to 8 bits first.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


#: Photo file endings picked up when a folder is given to the predict tool.
PHOTO_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


def expand_photo_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files named directly, plus the photos (by suffix) found under named folders, sorted.

    Returns (files, errors): errors are (path, reason) for paths that do not exist, and for
    photo-named fifos, devices and sockets (never opened: a fifo would block the reader).
    A file named directly is kept whatever its suffix: decoding decides.
    """
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, refused = _photos_under(p)
            if not found and not refused:
                errors.append((p, f"no photos ({', '.join(PHOTO_SUFFIXES)}) under this folder"))
            errors += refused
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append((p, path_refusal(p) or "no such file or folder"))
    return files, errors


def _photos_under(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(photo files, (path, reason) of refused photo-named special files) under `folder`, sorted."""
    named = sorted(f for f in folder.rglob("*") if f.suffix.lower() in PHOTO_SUFFIXES
                   and not f.name.startswith("._") and not f.is_dir())
    refusals = {f: path_refusal(f) for f in named}  # None: a regular file (or a dangling link)
    found = [f for f in named if refusals[f] is None and f.is_file()]
    refused = [(f, reason) for f, reason in refusals.items() if reason is not None]
    return found, refused


def open_photo(
    path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Open one photo file as RGB (EXIF rotation applied; bomb guard; clear errors).

    Only a regular file of at most ``max_image_bytes`` is read (NotRegularFileError,
    InputTooLargeError otherwise, before any byte is read)."""
    return decode_image(read_capped(path, max_image_bytes), str(path), max_image_pixels, max_image_bytes)
