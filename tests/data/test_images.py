"""The one image decoder: every mode PIL opens comes out as the RGB a viewer shows, bad files are named."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from genret.data.images import MAX_PIXELS_ENV, ImageLoadError, load_image, probe_image

WHITE, BLACK, RED, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255)


def _grey16(path, value, mode="I;16"):
    data = np.full((4, 4), value, dtype=">u2" if mode == "I;16B" else "<u2")
    Image.frombytes(mode, (4, 4), data.tobytes()).save(path)


def _grey32(path, value):
    Image.fromarray(np.full((4, 4), value, dtype=np.int32)).save(path)  # mode I


def _float(path, value):
    Image.fromarray(np.full((4, 4), value, dtype=np.float32)).save(path)  # mode F


def _palette_transparent(path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1])
    img.save(path, transparency=0)  # index 0 (red) is transparent


def _la(path):
    Image.frombytes("LA", (3, 1), bytes([0, 0, 0, 255, 100, 128])).save(path)


def _rgba(path):
    Image.frombytes("RGBA", (2, 1), bytes([255, 0, 0, 0, 0, 0, 255, 255])).save(path)


def _cmyk(path):
    Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255])).save(path)


def _exif_rotated(path):
    img = Image.new("RGB", (2, 1))
    img.putdata([RED, BLUE])
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180°
    img.save(path, exif=exif)


def _animated(path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _one_bit(path):
    img = Image.new("1", (2, 1))
    img.putdata([1, 0])
    img.save(path)


def _lab(path):
    Image.new("LAB", (2, 2), (128, 128, 128)).save(path)  # L = 50 %, a = b = 0: a neutral grey


@pytest.mark.parametrize("name,write,expected", [
    ("grey16-mid.png", lambda p: _grey16(p, 32768), [(128, 128, 128)]),  # was pure white
    ("grey16-max.png", lambda p: _grey16(p, 65535), [WHITE]),
    ("grey16-low.png", lambda p: _grey16(p, 255), [BLACK]),  # 255 of 65535 is near black, not full white
    ("grey16b-mid.tif", lambda p: _grey16(p, 32768, "I;16B"), [(128, 128, 128)]),
    ("grey32-16bit.tif", lambda p: _grey32(p, 32896), [(128, 128, 128)]),  # I holding 16-bit values
    ("float-half.tif", lambda p: _float(p, 0.5), [(128, 128, 128)]),
    ("float-255.tif", lambda p: _float(p, 64.0), [(64, 64, 64)]),
    ("palette-transparent.png", _palette_transparent, [WHITE, BLUE]),
    ("la.png", _la, [WHITE, BLACK, (177, 177, 177)]),  # alpha composited on white
    ("rgba.png", _rgba, [WHITE, BLUE]),
    ("cmyk.tif", _cmyk, [WHITE, RED, BLACK]),
    ("exif-rotated.png", _exif_rotated, [BLUE, RED]),
    ("animated.gif", _animated, [RED]),  # the first frame
    ("one-bit.png", _one_bit, [WHITE, BLACK]),
    ("lab.tif", _lab, [(119, 119, 119)]),
])
def test_every_mode_decodes_to_the_rgb_a_viewer_shows(tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    img = load_image(path)
    assert img.mode == "RGB"
    row = [img.getpixel((x, 0)) for x in range(len(expected))]
    assert all(max(abs(a - b) for a, b in zip(got, want)) <= 1 for got, want in zip(row, expected)), row
    assert probe_image(path) is None


@settings(max_examples=40, deadline=None)
@given(value=st.integers(0, 65535), big_endian=st.booleans())
def test_16_bit_grey_keeps_its_level(tmp_path_factory, value, big_endian):
    path = tmp_path_factory.mktemp("g") / ("g.tif" if big_endian else "g.png")
    _grey16(path, value, "I;16B" if big_endian else "I;16")
    assert load_image(path).getpixel((1, 1)) == (value >> 8,) * 3


@settings(max_examples=30, deadline=None)
@given(value=st.integers(0, 65535))
def test_a_16_bit_pil_image_given_directly_decodes_the_same(value):
    img = Image.frombytes("I;16", (2, 2), np.full((2, 2), value, dtype="<u2").tobytes())
    assert load_image(img).getpixel((0, 0)) == (value >> 8,) * 3


@pytest.mark.parametrize("content,match", [
    (b"just some text\n", "not a readable image"),
    (b"", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not"),
])
def test_files_that_are_not_images_are_named(tmp_path, content, match):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value) and "--on-error skip" in str(err.value)
    assert str(path) in probe_image(path)


def test_a_truncated_image_is_named(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cut.png: not a readable image"):
        load_image(path)


def test_missing_files_and_symlink_loops_are_named(tmp_path):
    with pytest.raises(ImageLoadError, match="image file not found: .*gone.png"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    with pytest.raises(ImageLoadError, match="loop.png"):
        load_image(tmp_path / "loop.png")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    """A 32 KB PNG of 256 million pixels: PIL's own guard raises DecompressionBombError (not a ValueError), once a
    raw traceback from the CLI."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (16000, 16000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="bomb.png: refused by PIL's decompression-bomb guard"):
        load_image(bomb)
    assert "decompression-bomb" in probe_image(bomb)


@pytest.mark.parametrize("size", [(9000, 9000), (100, 100)])
def test_genret_pixel_limit_and_pils_warning_are_errors(tmp_path, monkeypatch, size):
    """9000² is past PIL's warning (89 M pixels) but below its error: genret refuses it (its limit is 8192²)."""
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)
    if size == (100, 100):
        monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageLoadError, match=f"big.png: the image is {size[0]}×{size[1]}.*{MAX_PIXELS_ENV}"):
        load_image(path)
    assert load_image(path, max_pixels=size[0] * size[1]).size == size


def test_a_bad_pixel_limit_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    path = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(ImageLoadError, match=f"{MAX_PIXELS_ENV}='lots'"):
        load_image(path)


def test_float_images_with_nan_are_refused(tmp_path):
    path = tmp_path / "nan.tif"
    _float(path, float("nan"))
    with pytest.raises(ImageLoadError, match="nan.tif: .*NaN"):
        load_image(path)


def test_no_image_is_opened_outside_the_decoder():
    """Every image read goes through genret.data.images (the HTTP service checks request bytes itself)."""
    from pathlib import Path

    import genret

    root = Path(genret.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "Image.open(" in p.read_text() and p.name != "images.py" and "serve" not in p.parts]
    assert offenders == []


@pytest.fixture
def bomb_data(tmp_path):
    """A JSONL data set whose second image is a 32 KB decompression bomb (256 million pixels)."""
    import json

    Image.new("RGB", (16, 16), RED).save(tmp_path / "ok.png")
    Image.new("1", (16000, 16000)).save(tmp_path / "bomb.png")
    lines = [{"image": "ok.png", "captions": ["a red square"], "split": "test"},
             {"image": "bomb.png", "captions": ["nothing to see"], "split": "test"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["search", "{out}", "--image", "{data}/bomb.png"],
    ["index", "build", "{clip}", "--data", "{data}/d.jsonl", "--out", "{out}"],
    ["eval", "{clip}", "--data", "{data}/d.jsonl", "--directions", "t2i"],
], ids=["search", "index-build", "eval"])
def test_the_cli_names_a_bomb_and_exits_2(bomb_data, clip_dir, tmp_path, capsys, argv):
    """PIL's DecompressionBombError is no ValueError: the command once ended in a traceback."""
    from genret.cli import main

    argv = [a.format(data=bomb_data, clip=clip_dir, out=tmp_path / "pipe") for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{bomb_data / 'bomb.png'}: refused by PIL's decompression-bomb guard" in err


def test_index_build_skips_a_bomb_when_asked(bomb_data, clip_dir, tmp_path, capsys):
    from genret.cli import main

    assert main(["-q", "index", "build", str(clip_dir), "--data", str(bomb_data / "d.jsonl"), "--out",
                 str(tmp_path / "pipe"), "--on-error", "skip"]) == 0
    assert "bomb.png: refused by PIL's decompression-bomb guard" in capsys.readouterr().err  # the warning names it
