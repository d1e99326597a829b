"""Decode photos: image bytes to RGB with a pixel cap, EXIF orientation and alpha on white.

- `decode_image` decodes bytes fully (the ingest's decode check, the service's uploads);
  `open_photo` reads one photo file first (capped, regular files only);
- `inspect_image` checks the caps and reads the header only (format, size, EXIF orientation), for a
  caller that decodes the bytes itself (the feature stage's device decoder);
- `to_rgb` turns any PIL mode into RGB;
- `expand_photo_paths` turns the files and folders given to the predict tool into photo files.

Images with more than `max_image_pixels` pixels (DEFAULT_MAX_IMAGE_PIXELS) raise PIL's
DecompressionBombError before any pixel is decoded; bytes over `max_image_bytes` raise
geodata.capped_io.InputTooLargeError before anything is decoded.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
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
    data: bytes, where: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES,
    *, min_side: int | None = None,
) -> Image.Image:
    """Decode image bytes fully; return RGB with EXIF orientation applied.

    ``min_side``: decode a JPEG at reduced scale (libjpeg's DCT scaling through PIL's
    ``draft``: 1/2, 1/4 or 1/8, the smallest that keeps both sides >= ``min_side``, so a
    caller resizing to ``min_side`` or less only ever downscales); a 909x512 photo with
    ``min_side=224`` decodes at 455x256, about 2.3x faster. The whole stream is still
    decoded (truncation is caught as without it). Other formats (PNG, WebP, ...) and JPEGs
    smaller than twice ``min_side`` decode at full size. None: full resolution. A reduced
    image carries ``info["full_size"]`` (the photo's (width, height) at full resolution) and
    ``info["draft_box"]`` (the float box (left, upper, right, lower) of its pixels that holds
    the whole photo: 454.5 of 455 columns for 909 at 1/2), both after EXIF orientation, so a
    caller can resize exactly as from the full image (``Image.resize(size, box=...)``).

    Raises InputTooLargeError when ``data`` is over ``max_image_bytes`` (nothing decoded),
    PIL.Image.DecompressionBombError above ``max_image_pixels`` (checked from the
    header, before any pixel is decoded) and ImageDecodeError (an OSError) when the data
    is truncated, corrupt or not an image; messages start with ``where``.
    """
    if min_side is not None and int(min_side) < 1:
        raise ValueError(f"{where}: min_side={min_side}: give a size of at least 1 pixel, or None for full resolution")
    check_size(len(data), max_image_bytes, where)
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image.width, image.height, max_image_pixels, where)
        full_size, drafted = image.size, None
        if min_side is not None:  # (mode, box of the photo in the reduced image) for a JPEG; None elsewhere
            drafted = image.draft("RGB", (int(min_side), int(min_side)))
        image.load()  # full decode: truncated data raises here, not later in a worker
        rgb = to_rgb(image)
        if drafted is not None and image.size != full_size:
            _mark_reduced(rgb, image, full_size, drafted[1])
        return rgb
    except Image.DecompressionBombError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        # PIL names an in-memory file by its repr ('<_io.BytesIO object at 0x...>'): say what it means
        detail = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        reason = f"{type(exc).__name__}: {detail}"
        raise ImageDecodeError(
            f"{where}: cannot decode image ({reason}); the file is truncated, corrupt or not an image", reason
        ) from exc


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes not decoded yet, with what their header says: ``format`` (PIL's name: 'JPEG',
    'PNG', ...), ``size`` (width, height) before EXIF orientation, ``orientation`` (the EXIF tag,
    1-8; 1 where absent or unreadable, as `to_rgb` then leaves the image unrotated)."""

    data: bytes
    format: str
    size: tuple[int, int]
    orientation: int


def inspect_image(
    data: bytes, where: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES,
) -> EncodedImage:
    """The header of image bytes, no pixel decoded: the same byte and pixel caps as `decode_image`
    (InputTooLargeError, PIL.Image.DecompressionBombError), ImageDecodeError when no image format
    recognises the header. A corrupt body is only found by decoding it."""
    check_size(len(data), max_image_bytes, where)
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header
        fmt, size = str(image.format), (int(image.width), int(image.height))
    except Exception as exc:
        detail = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        reason = f"{type(exc).__name__}: {detail}"
        raise ImageDecodeError(f"{where}: cannot read the image header ({reason}); the file is corrupt or not an image",
                               reason) from exc
    _check_pixels(size[0], size[1], max_image_pixels, where)
    orientation = _exif_orientation(image)
    return EncodedImage(data, fmt, size, orientation if 1 <= orientation <= 8 else 1)


def _check_pixels(width: int, height: int, max_image_pixels: int, where: str) -> None:
    """PIL.Image.DecompressionBombError when the header's size is over ``max_image_pixels``."""
    if width * height > max_image_pixels:
        raise Image.DecompressionBombError(
            f"{where}: {width}x{height} = {width * height} pixels exceeds max_image_pixels={max_image_pixels} "
            "(possible decompression bomb); raise the limit only for trusted data")


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag as ImageOps.exif_transpose reads it; 1 where it is absent or the EXIF
    is malformed (not a broken photo: left unrotated, as to_rgb does)."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _mark_reduced(rgb: Image.Image, decoded: Image.Image, full_size: tuple[int, int],
                  box: tuple[float, float, float, float]) -> None:
    """Set ``rgb.info`` full_size and draft_box (decode_image) for a JPEG decoded at reduced scale:
    ``box`` and ``full_size`` are given before EXIF orientation (``decoded``), stored after it."""
    orientation = _exif_orientation(decoded)
    (w, h), (left, upper, right, lower) = decoded.size, box
    if orientation in (2, 3, 7, 8):  # mirrored left-right before any axis swap (7, 8: with it)
        left, right = w - right, w - left
    if orientation in (3, 4, 6, 7):  # mirrored top-bottom
        upper, lower = h - lower, h - upper
    if orientation in (5, 6, 7, 8):  # the axes swap
        left, upper, right, lower, w, h, full_size = upper, left, lower, right, h, w, full_size[::-1]
    if rgb.size != (w, h):  # the orientation was not applied after all (malformed EXIF): no box
        return
    rgb.info["full_size"], rgb.info["draft_box"] = tuple(full_size), (left, upper, right, lower)


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
    path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES,
    *, min_side: int | None = None,
) -> Image.Image:
    """Open one photo file as RGB (EXIF rotation applied; bomb guard; clear errors).

    Only a regular file of at most ``max_image_bytes`` is read (NotRegularFileError,
    InputTooLargeError otherwise, before any byte is read). ``min_side``: a JPEG decoded at
    reduced scale (``decode_image``); None: full resolution."""
    return decode_image(read_capped(path, max_image_bytes), str(path), max_image_pixels, max_image_bytes,
                        min_side=min_side)
