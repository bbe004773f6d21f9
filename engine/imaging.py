"""Reading artwork into plain 8-bit RGB (+ alpha), and writing the protected copy back.

The attacks work on one simple thing: a uint8 ``H x W x 3`` array. Real files are
messier (EXIF rotation, transparency, CMYK, 16-bit, palettes, colour profiles), so
this module turns any file we accept into a :class:`SourceImage` and refuses the rest
with a :class:`~fixative.engine.errors.BadImage` whose message an artist can act on.
Everything the attack does not touch (alpha, ICC profile, DPI, EXIF) rides along in
the ``SourceImage`` and is written back by :func:`encode_image`.

Decisions worth knowing:

* **Small images are refused, not upscaled** (``MIN_SHORT_SIDE``). The perturbation
  must live in the pixels that get published. If we upscaled a 200 px image, computed
  the perturbation on the big copy and scaled it back down, the downscale would
  average most of the perturbation away; and publishing the upscaled copy instead
  would change the artist's image. So we ask for the full-size original.
* **Decompression bombs** are refused by our own limit, ``MAX_PIXELS``, checked on
  the header size before any pixel is decoded. We do not touch Pillow's global
  ``Image.MAX_IMAGE_PIXELS`` (other code in the process may rely on it).
* **Files are decoded completely inside decode_image**, so a truncated download fails
  here, with the file's name, instead of halfway through a 10-minute attack.
  :func:`decode_image` takes the file's bytes, so that the daemon can hash and decode
  the very bytes it read once (no window in which the file can be swapped);
  :func:`read_image` reads a path for the CLI.
  (This relies on Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` being left False.)
* **Higher bit depths are rounded, not truncated**, to 8 bits: ``round(v / 257)``.
  Truncating shifts the whole image darker by up to one level. Exception: Pillow
  itself decodes 16-bit *colour* PNG/TIFF files to 8 bits by keeping the high byte;
  we say so in ``notes`` (it is at most one level off).
* **Greyscale stays greyscale.** A grey file (bilevel, 8- or 16-bit, with or
  without alpha) is handed to the attack as RGB with three equal channels and
  ``grey`` set; the attack then keeps one perturbation for the three channels
  (``fixative.engine.pgd``), and :func:`encode_image` writes one grey channel
  back (8-bit "L", or "LA" with the alpha). An ink drawing must not come back
  with a colour tint. A file keeps its ICC profile only where the profile
  describes the output's colour space (GRAY for grey, RGB for colour).
* **CMYK becomes sRGB** through the embedded profile when there is one; the output
  is then sRGB and carries no profile.
* Missing files, directories and permission errors are *not* BadImage: the
  OSError propagates, because the fix is about the path, not the picture.

No torch here: the daemon imports this to vet files cheaply.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fixative.engine.errors import BadImage

MIN_SHORT_SIDE = 256
"""Smallest accepted short side, in pixels (see the module docstring for why we refuse)."""

MAX_PIXELS = 100_000_000
"""Largest accepted width x height (100 megapixels, e.g. 10000 x 10000).

Large enough for high-resolution scans of artwork; small enough that the decoded
RGB (300 MB) and the attack's float copies fit in memory. A file whose header
claims more is refused before decoding, which defeats decompression bombs: files
of a few kilobytes that would expand to gigabytes.
"""

OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
"""Formats encode_image writes, with the usual file suffix for each."""

LOSSY_FORMATS = frozenset({"jpeg", "webp"})
"""Formats that weaken the protection (lossy compression removes much of the
perturbation); callers should warn the user when one is chosen."""

ORIENTATION = 0x0112  # EXIF tag number

# Errors Pillow raises for files that are not images or are damaged. Its decoders
# are not consistent about which one they use, hence the long list.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

# Formats where several frames mean "several still images" (a camera's MPO with a
# depth or gain map, a multi-page TIFF), not an animation: we take the first.
_STILL_MULTI_IMAGE_FORMATS = {"MPO", "TIFF"}

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_GREY_MODES = {"1", "L", "LA"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "PA"}
_PLAIN_MODES = {"RGB", "RGBX", "YCbCr", "P"} | _GREY_MODES | _ALPHA_MODES


@dataclass(frozen=True)
class SourceImage:
    """An input image, decoded and normalised; what the attack and encode_image need."""

    rgb: np.ndarray  # uint8, H x W x 3, EXIF orientation already applied, sRGB-ish
    alpha: np.ndarray | None  # uint8, H x W, or None
    icc_profile: bytes | None  # carried to the output unchanged (None after CMYK->sRGB)
    dpi: tuple[float, float] | None
    exif: bytes | None  # original EXIF with Orientation reset to 1, or None
    notes: tuple[str, ...]  # human-readable conversions done, e.g. "16-bit input ..."
    grey: bool = False  # a greyscale file: rgb's channels are equal, and the output is written grey

    @classmethod
    def from_rgb(cls, rgb: np.ndarray) -> SourceImage:
        """What read_image makes of a plain 8-bit RGB PNG: the pixels, nothing else.

        For the tiny test model's images, whose 128 px are under MIN_SHORT_SIDE,
        so that the bench and tests can hand them to protect_image directly.
        """
        return cls(rgb=rgb, alpha=None, icc_profile=None, dpi=None, exif=None, notes=())


def read_image(path: Path) -> SourceImage:
    """Read ``path`` and :func:`decode_image` it.

    Missing file, directory, no permission: the OSError propagates (not BadImage).
    """
    return decode_image(Path(path).read_bytes(), str(path))


def decode_image(data: bytes, name: str) -> SourceImage:
    """Decode a whole image file's bytes completely, as 8-bit RGB (+ alpha) with metadata.

    Raises BadImage, naming the file (``name``), for anything we cannot or will not
    protect: empty, not an image, damaged, animated, too large, too small, unsupported mode.
    """
    if not data:
        raise BadImage(f"{name}: the file is empty (0 bytes).")
    with io.BytesIO(data) as fp:
        img = _open(fp, name)
        notes: list[str] = []
        try:
            _refuse_by_header(img, name, notes)
            high_byte_only = _decoded_from_16_bit_colour(img)  # must look before load()
            img.load()
            orientation = img.getexif().get(ORIENTATION, 1)
            upright = ImageOps.exif_transpose(img)
        except Image.DecompressionBombError as e:
            raise BadImage(_too_many_pixels(name, None)) from e
        except _PILLOW_ERRORS as e:
            raise BadImage(
                f"{name}: the image file is damaged or incomplete ({e}). "
                "Was it fully copied or downloaded?"
            ) from e
        exif = _exif_with_upright_orientation(img)
        dpi = _dpi(img.info, swap=orientation in (5, 6, 7, 8))

    if orientation != 1:
        notes.append(f"rotated/flipped upright according to EXIF orientation {orientation}")
    if high_byte_only:
        notes.append("16-bit colour input reduced to 8 bits (by the decoder, which keeps the high byte)")
    icc = upright.info.get("icc_profile") or None
    grey = upright.mode in _GREY_MODES | _SIXTEEN_BIT_MODES | {"F"}
    rgb, alpha, icc = _to_rgb_alpha(upright, icc, name, notes)
    space = b"GRAY" if grey else b"RGB "
    if icc is not None and icc[16:20] != space:
        # The ICC header names the colour space it describes; a file may only carry a
        # profile of its own space (any other would confuse colour-managed viewers).
        notes.append(f"{icc[16:20].decode('latin-1').strip()} colour profile dropped "
                     f"(output is {'greyscale' if grey else 'RGB'})")
        icc = None
    return SourceImage(rgb=rgb, alpha=alpha, icc_profile=icc, dpi=dpi, exif=exif, notes=tuple(notes), grey=grey)


def encode_image(rgb: np.ndarray, source: SourceImage, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode the protected pixels ``rgb`` with ``source``'s alpha, ICC profile, DPI and EXIF.

    ``fmt`` is ``png`` (default, lossless: the pixels read back exactly), ``jpeg`` or
    ``webp`` (lossy; ``quality`` 1-100). Lossy formats remove part of the protection,
    so callers should warn (see LOSSY_FORMATS).

    JPEG is written with 4:4:4 chroma (no subsampling): the usual 4:2:0 throws away
    three quarters of the colour detail, and with it much of the perturbation.
    Lossy WebP always subsamples chroma (libwebp has no 4:4:4 lossy mode); prefer PNG.

    Raises BadImage if the source has transparency and ``fmt`` is jpeg; ValueError
    for a bad argument (wrong array shape/dtype, unknown format, quality out of range).
    """
    fmt = fmt.lower().lstrip(".")
    fmt = {"jpg": "jpeg"}.get(fmt, fmt)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, not {quality}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape != source.rgb.shape:
        raise ValueError(
            f"expected a uint8 array of shape {source.rgb.shape} (the source's), "
            f"got {rgb.dtype} {rgb.shape}"
        )

    img = _grey_image(rgb) if source.grey else Image.fromarray(np.ascontiguousarray(rgb))  # mode L or RGB
    if source.alpha is not None:
        if fmt != "jpeg":
            img.putalpha(Image.fromarray(np.ascontiguousarray(source.alpha)))
        elif (source.alpha < 255).any():
            raise BadImage("JPEG cannot keep transparency; choose png or webp")
        # else: fully opaque alpha, so dropping it for JPEG loses nothing.

    params: dict = {}
    if source.icc_profile:
        params["icc_profile"] = source.icc_profile
    if source.exif:
        params["exif"] = source.exif
    if fmt == "png":
        if source.dpi:
            params["dpi"] = source.dpi
    elif fmt == "jpeg":
        params.update(quality=quality, subsampling=0)  # 0 = 4:4:4, see docstring
        if source.dpi:
            params["dpi"] = tuple(round(d) for d in source.dpi)  # JFIF stores integers
    else:  # webp has no DPI field
        params.update(quality=quality)

    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), **params)
    return buf.getvalue()


def _grey_image(rgb: np.ndarray) -> Image.Image:
    """The one channel of a grey source's protected pixels, as mode L.

    Unequal channels here mean the attack did not keep one perturbation for
    the three; writing one of them would hide that, so it is refused.
    """
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise ValueError("a greyscale source's pixels must have three equal channels")
    return Image.fromarray(np.ascontiguousarray(rgb[..., 0]))


def read_back_rgb(data: bytes) -> np.ndarray:
    """The RGB pixels of a file :func:`encode_image` wrote: what was saved, for the report to measure."""
    with warnings.catch_warnings():
        # Our own output, within MAX_PIXELS: Pillow's bomb warning (from 89 MP on) is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))


# --- helpers for read_image ------------------------------------------------------


def _open(fp, name: str) -> Image.Image:
    """Image.open (reads the header only), with its errors turned into BadImage."""
    try:
        with warnings.catch_warnings():
            # We apply MAX_PIXELS ourselves (_refuse_by_header); Pillow's own warning
            # is just noise. (catch_warnings swaps a process-wide list; at worst a
            # concurrent thread sees this one category silenced for a moment.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise BadImage(_too_many_pixels(name, None)) from e
    except UnidentifiedImageError as e:
        raise BadImage(
            f"{name}: this is not an image file we can read "
            "(expected PNG, JPEG, WebP, TIFF, GIF, BMP...)."
        ) from e
    except _PILLOW_ERRORS as e:
        raise BadImage(f"{name}: the image file is damaged ({e}).") from e


def _too_many_pixels(name: str, size: tuple[int, int] | None) -> str:
    claim = f"is {size[0]}x{size[1]} pixels, which is" if size else "is"
    return (
        f"{name}: the image {claim} over the {MAX_PIXELS // 1_000_000}-megapixel limit. "
        "Such files can exhaust the machine's memory (a 'decompression bomb'); "
        "if the image is real, resize it first."
    )


def _refuse_by_header(img: Image.Image, name: str, notes: list[str]) -> None:
    """Checks that need only the header: size limits and animation. Cheap, so first."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise BadImage(_too_many_pixels(name, img.size))
    if min(width, height) < MIN_SHORT_SIDE:
        raise BadImage(
            f"{name}: the image is {width}x{height} pixels; at least {MIN_SHORT_SIDE} "
            "pixels are needed on the short side. Protect the full-size original, "
            "not a thumbnail: protection computed on an enlarged copy does not survive "
            "being shrunk back."
        )
    if getattr(img, "is_animated", False):
        if img.format not in _STILL_MULTI_IMAGE_FORMATS:
            raise BadImage(f"{name}: animated images are not supported; export a single frame.")
        notes.append(f"the {img.format} file holds {img.n_frames} images; only the first was used")


def _decoded_from_16_bit_colour(img: Image.Image) -> bool:
    """True when Pillow will squeeze 16-bit colour channels to 8 bits as it decodes.

    Pillow has no 16-bit-per-channel colour mode: a 16-bit RGB(A) PNG or TIFF opens as
    plain RGB(A), and the decoder's "raw mode" (e.g. ``RGB;16B``) says so.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        return False  # greyscale 16-bit stays 16-bit; we round it ourselves
    for tile in img.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        # (BGR;16 is a packed 5-6-5 BMP pixel, not 16 bits per channel)
        if isinstance(rawmode, str) and re.search(r";16[BLN]?$", rawmode) and not rawmode.startswith("BGR"):
            return True
    return False


def _exif_with_upright_orientation(img: Image.Image) -> bytes | None:
    """The file's EXIF block (artists keep Artist/Copyright there) with Orientation = 1.

    We already rotated the pixels, so a viewer must not rotate them again. Only EXIF
    that the file really carries is kept (``info["exif"]``); for TIFF, Pillow's
    getexif() would also return the TIFF's own layout tags, which are not EXIF.
    """
    if not img.info.get("exif"):
        return None
    exif = Image.Exif()
    try:
        exif.load(img.info["exif"])
        if ORIENTATION in exif:
            exif[ORIENTATION] = 1
        return exif.tobytes()
    except _PILLOW_ERRORS:
        return None  # unreadable EXIF: drop it rather than refuse the picture


def _dpi(info: dict, swap: bool) -> tuple[float, float] | None:
    """DPI from the file, as floats; swapped when EXIF rotation turned the image 90 degrees."""
    try:
        x, y = (float(v) for v in info["dpi"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    return (y, x) if swap else (x, y)


def _to_rgb_alpha(
    img: Image.Image, icc: bytes | None, name: str, notes: list[str]
) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    """Normalise any accepted Pillow mode to (uint8 HxWx3, uint8 HxW or None, icc)."""
    mode = img.mode
    if mode == "CMYK":
        img, icc = _cmyk_to_srgb(img, icc, notes), None
        return np.array(img, dtype=np.uint8), None, icc

    if mode in _SIXTEEN_BIT_MODES:
        # round(v / 257) maps 0..65535 onto 0..255 exactly at both ends; float32 is
        # precise enough (no v/257 lies within 0.001 of a .5 tie).
        values = np.clip(np.asarray(img).astype(np.float32), 0, 65535)
        grey = np.rint(values / 257).astype(np.uint8)
        notes.append("16-bit greyscale input reduced to 8 bits (rounded); output is 8-bit greyscale")
        return np.repeat(grey[..., None], 3, axis=2), None, icc

    if mode == "F":
        values = np.nan_to_num(np.asarray(img), nan=0.0)
        grey = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        notes.append(
            "32-bit floating-point greyscale clipped to 0-255 and rounded to 8 bits; output is 8-bit greyscale"
        )
        return np.repeat(grey[..., None], 3, axis=2), None, icc

    if mode not in _PLAIN_MODES:
        raise BadImage(f"{name}: the colour mode {mode} is not supported; export the image as RGB.")

    # Transparency: an alpha channel, or a palette/single colour marked transparent (tRNS).
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    if mode == "1":
        notes.append("black-and-white input; output is 8-bit greyscale")
    elif mode in ("P", "PA"):
        notes.append("palette image converted to " + ("RGBA" if has_alpha else "RGB"))
    elif mode == "YCbCr":
        notes.append("YCbCr input converted to RGB")
    rgb = np.array(arr[..., :3], dtype=np.uint8)  # np.array copies: contiguous and writable
    alpha = np.array(arr[..., 3], dtype=np.uint8) if has_alpha else None
    return rgb, alpha, icc


def _cmyk_to_srgb(img: Image.Image, icc: bytes | None, notes: list[str]) -> Image.Image:
    """CMYK to sRGB: colour-managed with the embedded profile, naive otherwise.

    Pillow's plain CMYK->RGB conversion ignores the ink behaviour a profile
    describes, so colours can shift noticeably; we use it only as a fallback.
    """
    if icc:
        from PIL import ImageCms  # lazy: needs Pillow's LittleCMS extension

        try:
            out = ImageCms.profileToProfile(
                img,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            notes.append("CMYK converted to sRGB using the embedded colour profile")
            return out
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            notes.append("the embedded CMYK colour profile could not be used")
    notes.append("CMYK converted to RGB without a colour profile (colours may shift slightly)")
    return img.convert("RGB")
