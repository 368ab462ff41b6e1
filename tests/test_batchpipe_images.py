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


# --- images in object storage (an fsspec filesystem: here fsspec's in-memory one) -------------------


@pytest.fixture
def store(tmp_path):
    """A fresh in-memory fsspec filesystem holding s3://bkt/img/{a.png,b.gif} and s3://bkt/secret.png,
    and the url_fs callable the library takes (URL -> (filesystem, path))."""
    from urllib.parse import urlsplit

    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    files = {}
    for name, fmt in (("img/a.png", "PNG"), ("img/b.gif", "GIF"), ("secret.png", "PNG")):
        local = make_image(tmp_path / name.replace("/", "_"), fmt)
        files[name] = local.read_bytes()
        fs.pipe(f"/bkt/{name}", files[name])
    fs.pipe("/bkt/img/not-an-image.png", b"hello")
    calls = []

    def url_fs(url):
        calls.append(url)
        parts = urlsplit(url)
        return fs, f"/{parts.netloc}{parts.path}"

    url_fs.files, url_fs.calls = files, calls
    return url_fs


def test_store_url_cell_is_read_through_url_fs(store):
    url = image_url_for_cell("s3://bkt/img/a.png", None, url_fs=store)
    assert url == "data:image/png;base64," + base64.b64encode(store.files["img/a.png"]).decode()
    # relative cells under a URL base folder, ".." normalised
    url = image_url_for_cell("sub/../b.gif", "s3://bkt/img", url_fs=store)
    assert base64.b64decode(url.split(",", 1)[1]) == store.files["img/b.gif"]
    assert store.calls == ["s3://bkt/img/a.png", "s3://bkt/img/b.gif"]
    check_image_cell("a.png", "s3://bkt/img", url_fs=store)  # cheap check passes too


def test_store_images_fail_their_row_with_the_cell_named(store):
    with pytest.raises(RowError, match=r"^image file not found: missing\.png$"):
        image_url_for_cell("missing.png", "s3://bkt/img", url_fs=store)
    with pytest.raises(RowError, match=r"unsupported image type .*: not-an-image\.png$"):
        check_image_cell("not-an-image.png", "s3://bkt/img", url_fs=store)
    with pytest.raises(RowError, match=r"image too big: a\.png is"):
        image_url_for_cell("a.png", "s3://bkt/img", max_image_mb=0.00001, url_fs=store)
    with pytest.raises(RowError, match=r"image path is not a file: s3://bkt/img"):
        check_image_cell("s3://bkt/img", None, url_fs=store)
    # without a reader for object storage the row is invalid, not the run
    with pytest.raises(RowError, match=r"s3:// URLs are read only through object storage"):
        image_url_for_cell("s3://bkt/img/a.png", None)


def test_store_images_outside_the_url_roots_are_refused_before_any_read(store):
    from batchpipe.paths import Roots, parse_roots

    roots = Roots(parse_roots("s3://bkt/img"))
    assert image_url_for_cell("a.png", "s3://bkt/img", roots=roots, url_fs=store)
    with pytest.raises(RowError, match=r"image \.\./secret\.png is outside the allowed roots"):
        image_url_for_cell("../secret.png", "s3://bkt/img", roots=roots, url_fs=store)
    with pytest.raises(RowError, match="outside the allowed roots"):
        check_image_cell("s3://bkt/secret.png", None, roots=roots, url_fs=store)
    assert store.calls == ["s3://bkt/img/a.png"]  # refused cells were never opened


def test_build_with_an_image_base_url(store, tmp_path):
    import json

    from batchpipe import BuildOptions, build_jsonl, validate_csv

    src = tmp_path / "in.csv"
    src.write_text("prompt,image\nfirst,a.png\nsecond,\nthird,missing.png\nfourth,s3://bkt/img/b.gif\n")
    opts = BuildOptions(image_column="image", image_base_dir="s3://bkt/img/")
    summary = validate_csv(src, opts, allowed_roots=None, url_fs=store)
    assert (summary["valid"], summary["invalid"]) == (3, 1)
    assert summary["first_invalid"][0]["error"] == "image file not found: missing.png"
    built = build_jsonl(src, opts, tmp_path / "work", allowed_roots=None, url_fs=store)
    lines = [json.loads(x) for x in (tmp_path / "work" / "shard-00000.jsonl").read_text().splitlines()]
    contents = [line["body"]["messages"][-1]["content"] for line in lines]
    images = [p["image_url"]["url"] for c in contents if isinstance(c, list) for p in c if "image_url" in p]
    assert built["valid"] == 3 and len(lines) == 3
    assert [base64.b64decode(u.split(",", 1)[1]) for u in images] == [
        store.files["img/a.png"],
        store.files["img/b.gif"],
    ]


def test_a_transient_store_error_fails_the_build_not_the_row(store, tmp_path):
    """Throttling or a reset must not turn rows into 'not sent' for good: it propagates (the task's
    retry builds the row); only a missing, directory or forbidden object invalidates the row."""

    class Throttled:
        def info(self, path):
            raise TimeoutError("SlowDown: please reduce your request rate")

    with pytest.raises(TimeoutError):
        image_url_for_cell("a.png", "s3://bkt/img", url_fs=lambda url: (Throttled(), url))

    class Forbidden:
        def info(self, path):
            raise PermissionError("Access Denied")

    with pytest.raises(RowError, match=r"cannot read image a\.png: Access Denied"):
        check_image_cell("a.png", "s3://bkt/img", url_fs=lambda url: (Forbidden(), url))
    with pytest.raises(RowError, match=r"must not contain '\?' or '#'"):
        image_url_for_cell("s3://bkt/img/a.png#x", None, url_fs=store)


# ------------------------------------------------------------------ what an image error may quote


@pytest.mark.parametrize("cell", ["/proc/self/environ", "/dev/zero", "/sys/kernel/notes"])
def test_pseudo_files_are_not_images(monkeypatch, cell):
    """/proc files stat as regular files (size 0) and /dev/zero never ends: refused by where they live."""
    monkeypatch.setenv("LEAK_CANARY", "sk-canary-31b0")
    for call in (check_image_cell, image_url_for_cell):
        with pytest.raises(RowError, match=r"not a regular file") as caught:
            call(cell, None)
        assert "sk-canary-31b0" not in str(caught.value)


def test_fifo_is_not_an_image(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    for call in (check_image_cell, image_url_for_cell):
        with pytest.raises(RowError, match=r"pipe\.png.*not a regular file"):
            call("pipe.png", tmp_path)


def test_an_image_error_quotes_a_long_cell_shortened(tmp_path):
    cell = "sk-canary-31b0 " + "word " * 20_000 + "end.png"
    for call in (check_image_cell, image_url_for_cell):
        with pytest.raises(RowError, match=r"image .*sk-canary") as caught:
            call(cell, tmp_path)
        assert len(str(caught.value)) < 1000 and "end.png" in str(caught.value)


def test_a_signed_store_url_is_refused_without_its_signature():
    cell = "s3://bucket/a.png?X-Amz-Credential=AKIAQ&X-Amz-Signature=SigZZZ"
    with pytest.raises(RowError, match=r"must not contain") as caught:
        check_image_cell(cell, None, url_fs=lambda url: (None, url))
    assert "SigZZZ" not in str(caught.value) and "AKIAQ" not in str(caught.value)


def test_a_fifo_swapped_in_after_the_check_does_not_block_the_read(tmp_path):
    """size() saw a file; by read() the path is a FIFO with no writer: refused at once, not blocked."""
    import os
    import threading

    from batchpipe.images import _LocalImage

    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    box: dict = {}

    def read():
        try:
            box["value"] = _LocalImage(fifo, "swapped.png").read()
        except RowError as exc:
            box["error"] = exc

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    try:
        assert not t.is_alive(), "blocked on the FIFO"
        assert "not a regular file (a FIFO" in str(box.get("error")), box
    finally:  # unblock a reader stuck in open() (old behaviour), so its thread can end
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
