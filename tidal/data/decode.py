"""One image file to one uint8 C×H×W array: orientation, bit depth, colour mode and size.

Pillow does the decoding and resizing. Everything a real photo folder holds is brought to 8-bit
grayscale or RGB the same way for every file:

- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo stands as its
  owner sees it;
- 16-bit grayscale (`I;16*`, and `I` with values up to 65535, as PNG and TIFF store it) is
  scaled to 8 bits (value / 257, rounded), not clipped as `convert("L")` would; 32-bit `I`
  beyond 16 bits is scaled from its full range; float `F` is read as [0, 1];
- transparency (RGBA, LA, palette with transparency) is composited over white, as a viewer
  shows it, instead of dropping the alpha channel and leaving whatever colour hides under it;
- CMYK, YCbCr, palette and the other modes are converted to RGB by Pillow.

The pool is grayscale (C = 1) only when every file is; otherwise grayscale files are repeated to
three channels. Sizes: `size` 0 keeps each file's own size (the caller checks they agree);
otherwise one of RESIZE_POLICIES brings every image to size×size.

This module imports only numpy and Pillow: it runs in the decoding worker processes
(tidal.data.cache), which then start without torch.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# center-crop: the shorter side to `size`, then the centre `size`×`size` (what pretrained
#   ImageNet networks are evaluated on; loses the edges of a non-square photo).
# pad: the longer side to `size`, the rest filled with black (the whole photo, undistorted).
# stretch: both sides to `size` (the whole photo, aspect ratio changed).
RESIZE_POLICIES = ("center-crop", "pad", "stretch")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """A file that cannot be used as an image; the message says why in a few words."""


# Pillow refuses to open an image of over 2 × Image.MAX_IMAGE_PIXELS (179 M pixels by default) as
# a possible decompression bomb, from its header alone: a 16000×12000 panorama would be refused.
# A JPEG is decoded here at down to 1/8 of its size when `size` allows it (draft), so the limit
# that matters is on the pixels decoded (DECODED_PIXEL_LIMIT, checked in decode); Pillow's header
# check is raised to what a 1/8 decode brings under it (64×). Set for the whole process, always
# to the same value: lowering it again after each open would race between threads.
DECODED_PIXEL_LIMIT = 178_956_970
PILLOW_MAX_IMAGE_PIXELS = DECODED_PIXEL_LIMIT * 64 // 2  # Pillow refuses at twice its setting


def _open(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = PILLOW_MAX_IMAGE_PIXELS
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        import os

        raise BadImage("empty file" if os.path.getsize(path) == 0 else "not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(f"unreadable ({err})") from None


def probe(path: str) -> tuple[str, int, int]:
    """(mode, width, height) as the image will stand after EXIF orientation, from its header.

    Reads no pixel data, so a whole folder is probed quickly; a file that is not an image
    raises BadImage.
    """
    with _open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION)
        except Exception:  # a damaged EXIF block: the pixels may still be fine, and are decoded later
            orientation = None
        if orientation in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        return im.mode, width, height


def _draft_size(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """The smallest decoded size the resize needs: JPEG can decode at 1/2, 1/4 or 1/8 scale for
    free (`Image.draft`), which makes phone photos several times faster to bring to 224 px."""
    if resize == "stretch":
        return size, size
    scale = size / (min(width, height) if resize == "center-crop" else max(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _eight_bit(im: Any) -> Any:
    """The image in mode L or RGB, with 8 bits per channel (see the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode in SIXTEEN_BIT_MODES or values.max(initial=0) <= 65535 else 2.0 ** 31 - 1
        return Image.fromarray(np.round(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8), "L")
    if mode == "F":
        values = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba)
        return flat.convert("L" if mode.startswith("L") else "RGB")
    return im.convert("RGB")


def _resized(im: Any, size: int, resize: str) -> Any:
    from PIL import Image, ImageOps

    method = Image.Resampling.BILINEAR
    if resize == "center-crop":
        return ImageOps.fit(im, (size, size), method=method)
    if resize == "pad":
        return ImageOps.pad(im, (size, size), method=method, color=0)
    return im.resize((size, size), method)


def decode(path: str, gray: bool, size: int = 0, resize: str = "center-crop") -> np.ndarray:
    """The image at `path` as a uint8 array C×H×W (C = 1 when `gray`, else 3).

    size 0: the file's own size (after orientation); else `size`×`size` by `resize`.
    Raises BadImage for anything that cannot be decoded (truncated data included).
    """
    from PIL import Image, ImageOps

    with _open(path) as im:
        try:
            if size and im.format == "JPEG":
                width, height = im.size
                im.draft(im.mode, _draft_size(width, height, size, resize))
            if im.size[0] * im.size[1] > DECODED_PIXEL_LIMIT:
                hint = "" if size else "; set image_size (a JPEG is then decoded at down to 1/8 of its size)"
                raise BadImage(f"too large to decode: {im.size[0]}×{im.size[1]} pixels, over "
                               f"{DECODED_PIXEL_LIMIT:,}{hint}")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: an upright photo is not copied
            im = _eight_bit(im)
            if im.mode != ("L" if gray else "RGB"):  # convert() to the mode it has copies the pixels
                im = im.convert("L" if gray else "RGB")
            if size:
                im = _resized(im, size, resize)
            array = np.array(im, dtype=np.uint8)
        except BadImage:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadImage(f"cannot decode ({err})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
