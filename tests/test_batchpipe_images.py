"""Image cells: data URLs of exact bytes, MIME sniffing, row errors."""

import base64

import pytest
from PIL import Image

from batchpipe.errors import RowError
from batchpipe.images import check_image_cell, encode_image, image_url_for_cell, sniff_mime


def make_image(path, fmt, color=(200, 30, 30), size=(16, 12)):
    Image.new("RGB", size, color).save(path, fmt)
    return path


@pytest.mark.parametrize(
    "name, fmt, mime",
    [
        ("a.png", "PNG", "image/png"),
        ("a.jpg", "JPEG", "image/jpeg"),
        ("a.gif", "GIF", "image/gif"),
        ("a.webp", "WEBP", "image/webp"),
    ],
)
def test_encode_exact_bytes_and_mime(tmp_path, name, fmt, mime):
    p = make_image(tmp_path / name, fmt)
    url, got_mime, n = encode_image(p)
    raw = p.read_bytes()
    assert got_mime == mime and n == len(raw)
    assert url == f"data:{mime};base64," + base64.b64encode(raw).decode()
    assert base64.b64decode(url.split(",", 1)[1]) == raw


def test_mime_from_magic_not_extension(tmp_path):
    p = make_image(tmp_path / "really_a_png.jpg", "PNG")
    assert encode_image(p)[1] == "image/png"


def test_unsupported_type(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"BM not really an image")
    with pytest.raises(RowError, match="unsupported image type"):
        encode_image(p)
    assert sniff_mime(b"") is None


def test_missing_and_empty_and_too_big(tmp_path):
    with pytest.raises(RowError, match="image file not found: nope.png"):
        image_url_for_cell("nope.png", tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(RowError, match="empty"):
        check_image_cell("empty.png", tmp_path)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 2_000_000)
    with pytest.raises(RowError, match="image too big"):
        image_url_for_cell("big.png", tmp_path, max_image_mb=1)
    with pytest.raises(RowError, match="image too big"):
        check_image_cell("big.png", tmp_path, max_image_mb=1)


def test_relative_to_csv_dir_urls_and_empty(tmp_path):
    (tmp_path / "imgs").mkdir()
    p = make_image(tmp_path / "imgs" / "a.png", "PNG")
    assert image_url_for_cell("imgs/a.png", tmp_path) == encode_image(p)[0]
    assert image_url_for_cell("https://example.com/a.png", tmp_path) == "https://example.com/a.png"
    assert image_url_for_cell("http://example.com/x", None) == "http://example.com/x"
    assert image_url_for_cell("", tmp_path) is None
    assert image_url_for_cell("   ", tmp_path) is None
