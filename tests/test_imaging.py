"""fixative.engine.imaging: real files written with Pillow into tmp_path, no mocks."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from conftest import painting
from fixative.engine.errors import BadImage
from fixative.engine.imaging import (
    MAX_PIXELS,
    MIN_SHORT_SIDE,
    ORIENTATION,
    SourceImage,
    encode_image,
    read_image,
)

ARTIST, COPYRIGHT = 0x013B, 0x8298  # EXIF tags artists fill in
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def exif_with(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ARTIST] = "A. Painter"
    exif[COPYRIGHT] = "(c) A. Painter, all rights reserved"
    if orientation is not None:
        exif[ORIENTATION] = orientation
    return exif


def reopen(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG assembled by hand, for headers Pillow will not write (16-bit RGB, lies)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


# --- round trips --------------------------------------------------------------------


def test_png_round_trip_keeps_size_alpha_icc_dpi_exif_and_exact_pixels(tmp_path):
    rgba = noise(257, 300, 4)
    path = tmp_path / "art.png"
    Image.fromarray(rgba).save(path, icc_profile=SRGB_ICC, dpi=(300, 300), exif=exif_with())

    src = read_image(path)
    assert src.rgb.dtype == np.uint8 and src.rgb.shape == (257, 300, 3)
    np.testing.assert_array_equal(src.rgb, rgba[..., :3])
    np.testing.assert_array_equal(src.alpha, rgba[..., 3])
    assert src.icc_profile == SRGB_ICC
    assert src.dpi == pytest.approx((300, 300), abs=0.01)
    assert src.notes == ()

    protected = np.clip(src.rgb.astype(int) + noise(257, 300, seed=1) % 9 - 4, 0, 255).astype(np.uint8)
    out = reopen(encode_image(protected, src))
    assert out.format == "PNG" and out.mode == "RGBA" and out.size == (300, 257)
    np.testing.assert_array_equal(np.asarray(out)[..., :3], protected)
    np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])
    assert out.info["icc_profile"] == SRGB_ICC
    assert out.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert out.getexif()[COPYRIGHT] == "(c) A. Painter, all rights reserved"


def test_exif_orientation_is_applied_and_reset_to_1(tmp_path):
    pixels = noise(256, 320)
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif_with(orientation=6), dpi=(300, 150))

    src = read_image(path)
    # Orientation 6: the camera was turned, a viewer rotates 90 degrees clockwise.
    np.testing.assert_array_equal(src.rgb, np.rot90(pixels, k=-1))
    assert src.dpi == pytest.approx((150, 300), abs=0.05)  # the axes turned too
    assert any("orientation 6" in n for n in src.notes)

    out = reopen(encode_image(src.rgb, src))
    assert out.size == (256, 320)
    assert out.getexif()[ORIENTATION] == 1  # a viewer must not rotate it again
    assert out.getexif()[ARTIST] == "A. Painter"
    assert read_image_bytes(tmp_path, encode_image(src.rgb, src)).rgb.shape == (320, 256, 3)


def read_image_bytes(tmp_path: Path, data: bytes, name: str = "again.png") -> SourceImage:
    path = tmp_path / name
    path.write_bytes(data)
    return read_image(path)


def test_jpeg_with_orientation_is_turned_upright(tmp_path):
    pixels = np.zeros((256, 384, 3), np.uint8)
    pixels[:, :192] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 192:] = (0, 0, 255)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, exif=exif_with(orientation=6), quality=95)

    src = read_image(path)
    assert src.rgb.shape == (384, 256, 3)  # turned clockwise: red on top
    assert src.rgb[10, 128, 0] > 200 and src.rgb[-10, 128, 2] > 200
    assert _orientation(src.exif) == 1


def _orientation(exif_bytes: bytes) -> int:
    exif = Image.Exif()
    exif.load(exif_bytes)
    return exif[ORIENTATION]


def test_jpeg_output_is_444_with_quality_icc_dpi_exif(tmp_path):
    path = tmp_path / "art.png"
    Image.fromarray(noise(256, 256)).save(path, icc_profile=SRGB_ICC, dpi=(300, 300), exif=exif_with())
    src = read_image(path)

    out = reopen(encode_image(src.rgb, src, fmt="jpg", quality=90))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert JpegImagePlugin.get_sampling(out) == 0  # 4:4:4, no chroma subsampling
    assert out.info["icc_profile"] == SRGB_ICC
    assert out.info["dpi"] == (300, 300)
    assert out.getexif()[ARTIST] == "A. Painter"


def test_jpeg_refuses_transparency_but_accepts_opaque_alpha(tmp_path):
    rgba = noise(256, 256, 4)
    rgba[..., 3] = 255
    opaque = read_image_bytes(tmp_path, _png_bytes(rgba), "opaque.png")
    assert reopen(encode_image(opaque.rgb, opaque, fmt="jpeg")).mode == "RGB"

    rgba[0, 0, 3] = 0
    see_through = read_image_bytes(tmp_path, _png_bytes(rgba), "see-through.png")
    with pytest.raises(BadImage, match="JPEG cannot keep transparency"):
        encode_image(see_through.rgb, see_through, fmt="jpeg")


def _png_bytes(array: np.ndarray, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **params)
    return buf.getvalue()


def test_webp_output_keeps_alpha(tmp_path):
    rgba = noise(256, 256, 4)
    rgba[:128, :, 3] = 0
    rgba[128:, :, 3] = 255
    src = read_image_bytes(tmp_path, _png_bytes(rgba))
    out = reopen(encode_image(src.rgb, src, fmt="webp", quality=80))
    assert out.format == "WEBP" and out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])


def test_webp_output_keeps_icc_and_exif(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(noise(256, 256)).save(path, icc_profile=SRGB_ICC, exif=exif_with(orientation=3))
    src = read_image(path)
    out = reopen(encode_image(src.rgb, src, fmt="webp"))
    assert out.info["icc_profile"] == SRGB_ICC
    assert out.getexif()[ARTIST] == "A. Painter" and out.getexif()[ORIENTATION] == 1


def test_encode_rejects_wrong_arguments(tmp_path):
    src = read_image_bytes(tmp_path, _png_bytes(noise(256, 256)))
    with pytest.raises(ValueError, match="format"):
        encode_image(src.rgb, src, fmt="gif")
    with pytest.raises(ValueError, match="quality"):
        encode_image(src.rgb, src, fmt="jpeg", quality=0)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(src.rgb.astype(np.float32), src)
    with pytest.raises(ValueError, match="shape"):
        encode_image(src.rgb[:-1], src)


# --- conversions ----------------------------------------------------------------------


def test_greyscale_and_bilevel_are_read_with_equal_channels_and_written_grey(tmp_path):
    grey = noise(256, 260, 1)[..., 0]
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    src = read_image(path)
    assert src.grey and src.rgb.shape == (256, 260, 3) and src.alpha is None
    for c in range(3):
        np.testing.assert_array_equal(src.rgb[..., c], grey)
    assert not any("RGB" in n for n in src.notes)
    written = reopen(encode_image(src.rgb, src))
    assert written.mode == "L"
    np.testing.assert_array_equal(np.array(written), grey)
    assert reopen(encode_image(src.rgb, src, "jpeg")).mode == "L"

    tinted = src.rgb.copy()
    tinted[0, 0, 2] ^= 1
    with pytest.raises(ValueError, match="three equal channels"):
        encode_image(tinted, src)

    path = tmp_path / "ink.png"
    Image.fromarray(grey > 127).convert("1").save(path)
    ink = read_image(path)
    assert ink.grey and set(np.unique(ink.rgb)) <= {0, 255}
    assert reopen(encode_image(ink.rgb, ink)).mode == "L"


def test_colour_image_with_equal_channels_stays_rgb(tmp_path):
    grey = noise(256, 260, 1)[..., 0]
    path = tmp_path / "grey-as-rgb.png"
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path)
    src = read_image(path)
    assert not src.grey
    assert reopen(encode_image(src.rgb, src)).mode == "RGB"


def test_greyscale_with_alpha_is_written_la_with_the_same_alpha(tmp_path):
    grey = noise(256, 260, 2)[..., 0]
    path = tmp_path / "grey-alpha.png"
    Image.fromarray(np.stack([grey, 255 - grey], axis=-1)).save(path)  # two channels: mode LA
    src = read_image(path)
    assert src.grey
    np.testing.assert_array_equal(src.alpha, 255 - grey)
    written = reopen(encode_image(src.rgb, src))
    assert written.mode == "LA"
    np.testing.assert_array_equal(np.array(written)[..., 1], 255 - grey)


def test_greyscale_keeps_a_grey_profile_and_drops_an_rgb_one(tmp_path):
    grey = noise(256, 260, 3)[..., 0]
    gray_profile = SRGB_ICC[:16] + b"GRAY" + SRGB_ICC[20:]  # the header field decode_image reads
    for profile, kept in ((gray_profile, True), (SRGB_ICC, False)):
        path = tmp_path / "profiled.png"
        Image.fromarray(grey).save(path, icc_profile=profile)
        src = read_image(path)
        assert (src.icc_profile == profile) is kept
        assert any("profile dropped (output is greyscale)" in n for n in src.notes) is not kept


def test_only_png_keeps_the_strength_bound_and_the_readme_says_so(tmp_path):
    path = tmp_path / "painting.png"
    Image.fromarray(painting(300, 400)).save(path)
    src = read_image(path)
    signs = np.random.default_rng(0).choice([-8, 8], src.rgb.shape)  # the worst case of strength 8
    protected = np.clip(src.rgb.astype(int) + signs, 0, 255).astype(np.uint8)
    change = {fmt: int(np.abs(np.asarray(reopen(encode_image(protected, src, fmt)).convert("RGB"), int)
                              - src.rgb).max()) for fmt in ("png", "jpeg", "webp")}
    assert change["png"] == 8 and change["jpeg"] > 20 and change["webp"] > 100, change
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "The saved PNG (the default format), read back, differs from the original by at most `strength`" in readme
    assert "JPEG and WebP outputs do not keep that bound" in readme


def test_sixteen_bit_greyscale_is_rounded_not_truncated(tmp_path):
    # 511/257 = 1.99 -> 2 (truncation says 1); 385 -> 1.498 -> 1; 386 -> 1.502 -> 2
    values = np.array([0, 511, 385, 386, 32896, 65535], np.uint16)
    grey16 = np.resize(values, (256, 258)).astype(np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file

    src = read_image(path)
    expected = np.resize(np.array([0, 2, 1, 2, 128, 255], np.uint8), (256, 258))
    np.testing.assert_array_equal(src.rgb[..., 0], expected)
    np.testing.assert_array_equal(src.rgb[..., 2], expected)
    assert any("16-bit" in n and "rounded" in n for n in src.notes)
    assert src.grey and reopen(encode_image(src.rgb, src)).mode == "L"


def test_sixteen_bit_colour_png_is_read_and_noted(tmp_path):
    rows = b"".join(b"\x00" + noise(1, 256 * 6, 1, seed=y).tobytes() for y in range(256))
    path = tmp_path / "deep.png"
    path.write_bytes(raw_png(256, 256, 16, 2, rows))  # colour type 2 = RGB, 16 bits
    src = read_image(path)
    assert src.rgb.shape == (256, 256, 3)
    assert any("16-bit colour" in n for n in src.notes)


def test_palette_with_transparency_gives_alpha(tmp_path):
    indices = np.resize(np.arange(4, dtype=np.uint8), (256, 256))
    img = Image.frombytes("P", (256, 256), indices.tobytes())
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    path = tmp_path / "sticker.png"
    img.save(path, transparency=3)  # palette entry 3 is transparent

    src = read_image(path)
    np.testing.assert_array_equal(src.alpha, np.where(indices == 3, 0, 255))
    np.testing.assert_array_equal(src.rgb[indices == 1], np.tile([0, 255, 0], ((indices == 1).sum(), 1)))
    assert any("palette" in n for n in src.notes)
    assert reopen(encode_image(src.rgb, src)).mode == "RGBA"

    path = tmp_path / "still.gif"  # a single-frame GIF is fine
    img.save(path, transparency=3)
    assert read_image(path).alpha is not None


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = np.zeros((256, 256, 4), np.uint8)
    cmyk[:, :128, 0] = 255  # cyan ink on the left, bare paper on the right
    for name in ("print.jpg", "print.tif"):
        path = tmp_path / name
        Image.fromarray(cmyk, mode="CMYK").save(path)
        src = read_image(path)
        assert src.rgb.shape == (256, 256, 3) and src.icc_profile is None
        assert src.rgb[5, 5, 0] < 30 and src.rgb[5, 5, 2] > 200  # cyan
        assert (src.rgb[5, 250] > 240).all()  # white
        assert any("CMYK" in n for n in src.notes)


def test_cmyk_with_an_unusable_profile_falls_back(tmp_path):
    path = tmp_path / "odd.tif"
    Image.new("CMYK", (256, 256)).save(path, icc_profile=SRGB_ICC)  # an RGB profile: wrong
    src = read_image(path)
    assert src.icc_profile is None
    assert any("could not be used" in n for n in src.notes)


# --- bad files -------------------------------------------------------------------------


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(BadImage) as caught:
        read_image(path)
    message = str(caught.value)
    assert path.name in message
    for word in words:
        assert word in message, message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a shopping list, not a picture\n")
    _refused(path, "not an image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(noise(256, 256)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _refused(path, "damaged")


@pytest.mark.parametrize("name", ["loop.gif", "loop.png", "loop.webp"])
def test_animated_image(tmp_path, name):
    frames = [Image.fromarray(noise(256, 256, seed=s)) for s in range(2)]
    path = tmp_path / name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    _refused(path, "animated", "single frame")


@pytest.mark.parametrize("width, height", [(11_000, 10_000), (40_000, 40_000)])
def test_decompression_bomb(tmp_path, width, height):
    # A 256x256 PNG whose header is then rewritten to claim a huge size. 110 MP is
    # over our limit but under Pillow's error threshold; 1600 MP trips Pillow's own.
    data = bytearray(_png_bytes(noise(256, 256)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))

    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        _refused(path, f"{MAX_PIXELS // 1_000_000}-megapixel limit", "decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global setting untouched


def test_multi_picture_jpeg_uses_the_main_image(tmp_path):
    # Phones write MPO files (a JPEG plus a depth or gain map): several frames, but
    # not an animation. The first frame is the photo.
    first, second = Image.fromarray(noise(256, 300)), Image.fromarray(noise(256, 300, seed=1))
    path = tmp_path / "phone.jpg"
    first.save(path, format="MPO", save_all=True, append_images=[second])
    src = read_image(str(path))  # a str path is fine too
    assert src.rgb.shape == (256, 300, 3)
    assert any("only the first" in n for n in src.notes)


def test_too_small(tmp_path):
    path = tmp_path / "thumb.png"
    Image.fromarray(noise(MIN_SHORT_SIDE - 1, 1000)).save(path)
    _refused(path, "1000x255", f"at least {MIN_SHORT_SIDE}")


def test_unsupported_colour_mode(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (256, 256)).save(path)
    _refused(path, "colour mode LAB")


def test_missing_file_is_not_a_bad_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nowhere.png")
    with pytest.raises(IsADirectoryError):
        read_image(tmp_path)
