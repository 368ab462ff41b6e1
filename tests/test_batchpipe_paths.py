"""Allowed roots: the input CSV and image files must resolve inside OPENAI_BATCH_ALLOWED_ROOTS."""

from __future__ import annotations

import builtins
import csv
import json
import os
import pathlib
import sys
from pathlib import Path

import pytest
from PIL import Image

from batchpipe import BuildOptions, InputError, build_jsonl, merge_results, paths, validate_csv
from batchpipe.csvio import iter_rows
from batchpipe.paths import (
    ALLOWED_ROOTS_ENV,
    OUTPUT_ROOTS_ENV,
    PathNotAllowed,
    allowed_roots,
    check_within,
    output_roots,
)


@pytest.fixture(autouse=True)
def _no_roots_in_env(monkeypatch):
    """Tests start with neither setting, whatever the developer's shell has."""
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, "PNG")
    return path


@pytest.fixture
def layout(tmp_path):
    """root/data/in.csv, root/data/ok.png, outside/secret.png; returns (root, outside)."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    png(root / "data" / "ok.png")
    png(outside / "secret.png")
    return root, outside


IMG = BuildOptions(image_column="image")


# --------------------------------------------------------------------------- settings


def test_unset_means_no_restriction(tmp_path):
    assert allowed_roots() is None
    assert output_roots() is None
    assert allowed_roots(extra="") is None
    p = tmp_path / "x" / ".." / "a.csv"
    assert check_within(p, None, "input CSV") == (tmp_path / "a.csv").resolve()


def test_only_empty_entries_mean_no_restriction(monkeypatch):
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, os.pathsep + " " + os.pathsep)
    assert allowed_roots() is None


def test_env_and_extra_are_combined_and_resolved(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv(
        ALLOWED_ROOTS_ENV, f"{tmp_path / 'a'}{os.pathsep}{os.pathsep}{tmp_path / 'x' / '..' / 'b'}"
    )
    roots = allowed_roots(extra=f"{tmp_path / 'link'}{os.pathsep}")
    assert roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve(), (tmp_path / "real").resolve()]
    assert allowed_roots(extra=str(tmp_path / "c")) == [
        (tmp_path / "a").resolve(),
        (tmp_path / "b").resolve(),
        (tmp_path / "c").resolve(),
    ]


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert allowed_roots(extra="~/data") == [(tmp_path / "data").resolve()]


def test_check_within_message_and_root_itself(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert check_within(a, [a, b], "output folder") == a.resolve()  # a root itself is inside
    assert check_within(b / "x" / "y.csv", [a, b], "input CSV") == (b / "x" / "y.csv").resolve()
    with pytest.raises(PathNotAllowed) as e:
        check_within(tmp_path / "c" / "y.csv", [a, b], "input CSV")
    msg = str(e.value)
    assert msg == (
        f"input CSV {tmp_path / 'c' / 'y.csv'} is outside the allowed roots "
        f"({ALLOWED_ROOTS_ENV}: {a.resolve()}, {b.resolve()})"
    )
    assert isinstance(e.value, ValueError)


def test_prefix_is_not_inside(tmp_path):
    with pytest.raises(PathNotAllowed):
        check_within(tmp_path / "ab" / "f", [tmp_path / "a"], "input CSV")


def test_dotdot_escape_is_outside(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(PathNotAllowed, match="resolves to"):
        check_within(root / ".." / "secret", [root], "input CSV")


def test_empty_list_allows_nothing(tmp_path):
    with pytest.raises(PathNotAllowed):
        check_within(tmp_path / "f", [], "input CSV")


def test_symlink_loop_is_not_allowed(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(PathNotAllowed):
        check_within(tmp_path / "loop", [tmp_path / "elsewhere"], "image")


def test_output_roots_and_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(OUTPUT_ROOTS_ENV, str(out))
    roots = output_roots()
    assert roots == [out.resolve()]
    assert allowed_roots() is None  # the two settings are independent
    assert check_within(out, roots, "output folder") == out.resolve()
    assert (
        check_within(out / "run-1" / "results", roots, "output folder") == (out / "run-1/results").resolve()
    )
    with pytest.raises(PathNotAllowed) as e:
        check_within(tmp_path / "elsewhere", roots, "output folder")
    assert f"output folder {tmp_path / 'elsewhere'} is outside the allowed roots ({OUTPUT_ROOTS_ENV}:" in str(
        e.value
    )
    extra = output_roots(extra=str(tmp_path / "more"))
    assert extra == [out.resolve(), (tmp_path / "more").resolve()]
    assert check_within(tmp_path / "more" / "x", extra, "output folder")


# --------------------------------------------------------------------------- input CSV


def test_csv_outside_is_fatal_and_not_read(tmp_path, monkeypatch):
    p = write_csv(tmp_path / "outside" / "in.csv", [{"prompt": "hi"}])
    root = tmp_path / "root"
    root.mkdir()
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    for call in (
        lambda: validate_csv(p, BuildOptions(), allowed_roots=[root]),
        lambda: build_jsonl(p, BuildOptions(), tmp_path / "w", allowed_roots=[root]),
        lambda: iter_rows(p, allowed_roots=[root]),
    ):
        with pytest.raises(InputError) as e:
            call()
        assert str(p) in str(e.value) and ALLOWED_ROOTS_ENV in str(e.value)
        assert "is outside the allowed roots" in str(e.value)
    assert str(p) not in opened
    assert not (tmp_path / "w").exists()


def test_csv_outside_from_env(tmp_path, monkeypatch):
    p = write_csv(tmp_path / "outside" / "in.csv", [{"prompt": "hi"}])
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "root"))
    with pytest.raises(InputError, match=ALLOWED_ROOTS_ENV) as e:
        validate_csv(p, BuildOptions())
    assert str(p) in str(e.value)
    with pytest.raises(InputError, match=ALLOWED_ROOTS_ENV):
        build_jsonl(p, BuildOptions(), tmp_path / "w")
    with pytest.raises(InputError, match=ALLOWED_ROOTS_ENV):
        list(iter_rows(p))
    # an explicit None overrides the environment
    assert validate_csv(p, BuildOptions(), allowed_roots=None)["valid"] == 1


def test_csv_symlink_inside_pointing_outside(tmp_path):
    target = write_csv(tmp_path / "outside" / "in.csv", [{"prompt": "hi"}])
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.csv").symlink_to(target)
    with pytest.raises(InputError, match="is outside the allowed roots"):
        validate_csv(root / "in.csv", BuildOptions(), allowed_roots=[root])


def test_csv_inside_several_roots(tmp_path, monkeypatch):
    a = write_csv(tmp_path / "a" / "in.csv", [{"prompt": "hi"}])
    b = write_csv(tmp_path / "b" / "sub" / "in.csv", [{"prompt": "hi"}, {"prompt": "yo"}])
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert validate_csv(a, BuildOptions())["valid"] == 1
    assert build_jsonl(b, BuildOptions(), tmp_path / "w")["valid"] == 2
    assert [i for i, _ in iter_rows(b)] == [0, 1]
    c = write_csv(tmp_path / "c" / "in.csv", [{"prompt": "hi"}])
    with pytest.raises(InputError):
        validate_csv(c, BuildOptions())


def test_merge_checks_the_manifest_csv(tmp_path, monkeypatch):
    p = write_csv(tmp_path / "data" / "in.csv", [{"prompt": "hi"}])
    b = build_jsonl(p, BuildOptions(), tmp_path / "build", allowed_roots=None)
    with pytest.raises(InputError, match="is outside the allowed roots") as e:
        merge_results(b["manifest"], [], tmp_path / "out" / "r.csv", allowed_roots=[tmp_path / "other"])
    assert str(p.resolve()) in str(e.value)
    assert not (tmp_path / "out" / "r.csv").exists()
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "other"))
    with pytest.raises(InputError, match=ALLOWED_ROOTS_ENV):
        merge_results(b["manifest"], [], tmp_path / "out" / "r.csv")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "data"))
    report = merge_results(b["manifest"], [], tmp_path / "out" / "r.csv")
    assert report["rows"] == 1


# --------------------------------------------------------------------------- images


@pytest.fixture
def no_read_of(monkeypatch):
    """Record every open, read_bytes and Path.stat of a file under the banned folders, except the
    stat that ``Path.resolve()`` itself does (allowed: resolving is how the roots are checked)."""
    banned: list[Path] = []
    touched: list[str] = []
    real_open, real_stat, real_read_bytes = builtins.open, Path.stat, Path.read_bytes

    def hit(p) -> bool:
        try:
            rp = Path(os.path.realpath(os.fspath(p)))
        except TypeError:  # a file descriptor
            return False
        return any(rp.is_relative_to(b) for b in banned)

    def spy_open(file, *args, **kwargs):
        if hit(file):
            touched.append(f"open {file}")
        return real_open(file, *args, **kwargs)

    def spy_stat(self, *args, **kwargs):
        caller = sys._getframe(1).f_code
        if hit(self) and not (caller.co_name == "resolve" and caller.co_filename == pathlib.__file__):
            touched.append(f"stat {self}")
        return real_stat(self, *args, **kwargs)

    def spy_read_bytes(self):
        if hit(self):
            touched.append(f"read_bytes {self}")
        return real_read_bytes(self)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "stat", spy_stat)
    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)

    def ban(folder: Path) -> list[str]:
        banned.append(folder.resolve())
        return touched

    return ban


def image_csv(root: Path, cells: list[str]) -> Path:
    return write_csv(root / "data" / "in.csv", [{"prompt": f"p{i}", "image": c} for i, c in enumerate(cells)])


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_outside_makes_only_that_row_invalid(layout, how, no_read_of):
    root, outside = layout
    secret = outside / "secret.png"
    if how == "dotdot":
        cell = "../../outside/secret.png"
    elif how == "absolute":
        cell = str(secret)
    else:
        (root / "data" / "link.png").symlink_to(secret)
        cell = "link.png"
    p = image_csv(root, ["ok.png", cell, "https://example.com/x.png", ""])
    touched = no_read_of(outside)

    s = validate_csv(p, IMG, allowed_roots=[root])
    assert (s["valid"], s["invalid"]) == (3, 1)
    ex = s["first_invalid"][0]
    assert ex["row"] == 1 and ex["column"] == "image"
    assert ex["error"].startswith(f"image {cell} ")
    assert "is outside the allowed roots" in ex["error"] and ALLOWED_ROOTS_ENV in ex["error"]

    out = build_jsonl(p, IMG, root / "work", allowed_roots=[root])
    assert (out["valid"], out["invalid"]) == (3, 1)
    rec = json.loads(Path(out["invalid_path"]).read_text().splitlines()[0])
    assert rec["row"] == 1 and "is outside the allowed roots" in rec["error"]
    body = Path(out["shards"][0]["path"]).read_text()
    assert "data:image/png;base64," in body and "https://example.com/x.png" in body

    assert touched == []  # the outside file was never stat'ed, opened or read


def test_image_outside_from_env(layout, monkeypatch):
    root, outside = layout
    p = image_csv(root, [str(outside / "secret.png")])
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(root))
    s = validate_csv(p, IMG)
    assert s["invalid"] == 1 and "is outside the allowed roots" in s["first_invalid"][0]["error"]


def test_missing_image_outside_gets_the_roots_message(layout):
    root, _ = layout
    p = image_csv(root, ["../../nowhere/missing.png"])
    err = validate_csv(p, IMG, allowed_roots=[root])["first_invalid"][0]["error"]
    assert "is outside the allowed roots" in err and "not found" not in err


def test_images_inside_are_fine(layout):
    root, outside = layout
    png(root / "images" / "b.png")
    (root / "data" / "inner-link.png").symlink_to(root / "images" / "b.png")
    cells = ["ok.png", "../images/b.png", str(root / "images" / "b.png"), "inner-link.png", "http://x/y.jpg"]
    p = image_csv(root, cells)
    s = validate_csv(p, IMG, allowed_roots=[root])
    assert (s["valid"], s["invalid"]) == (5, 0)
    assert build_jsonl(p, IMG, root / "work", allowed_roots=[root])["valid"] == 5


def test_image_in_second_root(layout, monkeypatch):
    root, outside = layout
    p = image_csv(root, [str(outside / "secret.png"), "ok.png"])
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{root}{os.pathsep}{outside}")
    s = validate_csv(p, IMG)
    assert (s["valid"], s["invalid"]) == (2, 0)


def test_no_roots_no_restriction_for_images(layout):
    root, outside = layout
    p = image_csv(root, [str(outside / "secret.png"), "../../outside/secret.png"])
    s = validate_csv(p, IMG)
    assert (s["valid"], s["invalid"]) == (2, 0)


# --- URL roots (object storage) ---------------------------------------------------------------


def test_parse_roots_keeps_urls_whole_and_normalises_them(tmp_path):
    text = f"{tmp_path}:s3://Bucket/results/:gs://conn@other/x:file://{tmp_path}/sub"
    assert paths.parse_roots(text) == [
        tmp_path.resolve(),
        "s3://Bucket/results",
        "gs://other/x",
        (tmp_path / "sub").resolve(),
    ]


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/results",
        "s3://bucket/results/a/b.csv",
        "S3://my_conn@bucket/results/x",
        "s3://bucket/results/",
    ],
)
def test_url_inside_a_url_root(url):
    roots = paths.Roots(paths.parse_roots("s3://bucket/results"), setting=paths.OUTPUT_ROOTS_ENV)
    assert paths.check_within(url, roots, "output folder") == url


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/results-other/x",
        "s3://bucket/other",
        "gs://bucket/results/x",
        "s3://bucket/results/../secret",
    ],
)
def test_url_outside_a_url_root_is_refused(url):
    roots = paths.Roots(paths.parse_roots("s3://bucket/results"), setting=paths.OUTPUT_ROOTS_ENV)
    with pytest.raises(paths.PathNotAllowed, match=r"output folder s3://|output folder gs://"):
        paths.check_within(url, roots, "output folder")


def test_local_roots_refuse_urls_and_url_roots_refuse_local_paths(tmp_path):
    local_only = paths.Roots([tmp_path.resolve()], setting=paths.OUTPUT_ROOTS_ENV)
    with pytest.raises(paths.PathNotAllowed, match="OPENAI_BATCH_OUTPUT_ROOTS"):
        paths.check_within("s3://bucket/x", local_only, "output folder")
    url_only = paths.Roots(["s3://bucket"], setting=paths.OUTPUT_ROOTS_ENV)
    with pytest.raises(paths.PathNotAllowed):
        paths.check_within(tmp_path / "x", url_only, "output folder")
    # a file:// URL is a local path
    assert (
        paths.check_within(f"file://{tmp_path}/x", local_only, "output folder") == (tmp_path / "x").resolve()
    )


def test_no_roots_allows_any_url():
    assert paths.check_within("s3://bucket/anything", None, "output folder") == "s3://bucket/anything"


@pytest.mark.parametrize(
    "url, problem",
    [
        ("s3://bucket/results#/../../other/x", r"must not contain '\?' or '#'"),
        ("s3://bucket/results?/../../private", r"must not contain '\?' or '#'"),
        ("s3://AKIAX:s3cr3t@bucket/results/x", "must not carry credentials"),
        ("s3://AKIAX:s3/cr3t@bucket/results/x", "must not carry credentials"),
    ],
)
def test_urls_with_query_fragment_or_password_are_refused_whatever_the_roots(url, problem):
    roots = paths.Roots(paths.parse_roots("s3://bucket/results"), setting=paths.OUTPUT_ROOTS_ENV)
    for allowed in (roots, None):
        with pytest.raises(paths.PathNotAllowed, match=problem) as caught:
            paths.check_within(url, allowed, "output folder")
        assert "s3cr3t" not in str(caught.value)
    assert paths.redact_url("s3://AKIAX:s3cr3t@bucket/x") == "s3://***@bucket/x"
    assert paths.redact_url("s3://my_conn@bucket/x") == "s3://my_conn@bucket/x"  # a connection id stays


# ------------------------------------------------------------------ one redaction for everything shown


@pytest.mark.parametrize(
    "url, shown",
    [
        ("s3://AKIAXXX:SecretYYY@bucket/x.csv", "s3://***@bucket/x.csv"),
        ("s3://my_conn@bucket/x.csv", "s3://my_conn@bucket/x.csv"),  # a connection id is no secret
        ("s3://AKIAXXX:wJalr/K7MD+ENG/SecretYYY@bucket/x.csv", "s3://***@bucket/x.csv"),  # "/" in a secret
        ("s3://AKIAXXX:Secret@YYY@bucket/x.csv", "s3://***@bucket/x.csv"),
        ("s3://bucket/2024-01-01T10:00/user@example.com.csv", "s3://bucket/2024-01-01T10:00/user@example.com.csv"),
        ("https://ghp_tokenZZZ@github.com/o/r", "https://***@github.com/o/r"),  # on the web a user is
        ("https://b.s3.amazonaws.com/k.png?X-Amz-Credential=AKIAQ&X-Amz-Signature=SigZZZ",
         "https://b.s3.amazonaws.com/k.png?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("https://h/x?token=TokZZZ#access_token=TokZZZ", "https://h/x?token=***#***"),
        ("https://h/x?flag", "https://h/x?flag=***"),
        ("/data/in.csv", "/data/in.csv"),
        ("relative/in.csv", "relative/in.csv"),
        ("file:///data/in.csv", "file:///data/in.csv"),
        ("http://[::1/broken:SecretZZZ", "http://***"),
    ],
)  # fmt: skip
def test_redact_url(url, shown):
    assert paths.redact_url(url) == shown
    assert paths.redact_url(Path(url) if "://" not in url else url) == shown
    for secret in ("SecretYYY", "tokenZZZ", "SigZZZ", "TokZZZ", "SecretZZZ", "AKIAQ"):
        assert secret not in paths.redact_url(url)


def test_redact_text_and_url_origin():
    text = (
        "POST https://hooks.example.com/services/T0/B0/XXSECRET?token=TokZZZ failed; "
        "input 's3://AKIAX:SecretYYY@bucket/in.csv' and /data/plain.csv"
    )
    redacted = paths.redact_text(text)
    assert "TokZZZ" not in redacted and "SecretYYY" not in redacted
    assert "https://hooks.example.com/services/T0/B0/XXSECRET?token=***" in redacted
    assert "'s3://***@bucket/in.csv'" in redacted and "/data/plain.csv" in redacted
    origin = paths.redact_text(text, origin_only=True)
    assert "XXSECRET" not in origin and "https://hooks.example.com failed" in origin
    assert paths.url_origin("https://u:p@Hooks.Example.com:8443/a/b?c=d") == "https://hooks.example.com:8443"
    assert paths.url_origin("http://[::1]:9/x") == "http://[::1]:9"
    # a password with a space, a tab or a quote in it ends the URL early: its tail never shows
    for secret in ("Sec ret", "Sec\tret", "Sec'ret", 'Sec"ret'):
        shown = paths.redact_text(f"input s3://AKIA:{secret}@bucket/x.csv failed")
        assert "ret" not in shown and "Sec" not in shown and shown.endswith("@bucket/x.csv failed"), shown
    assert paths.redact_text("s3://my_conn@bucket/x.csv") == "s3://my_conn@bucket/x.csv"  # a conn id stays


def test_clip_and_quote_path():
    assert paths.clip("short") == "short"
    clipped = paths.clip("a" * 50 + "z" * 1000, 100)
    assert len(clipped) == 100 and clipped.startswith("a" * 50) and clipped.endswith("z") and "…" in clipped
    assert paths.clip("one\ntwo\x1b[31m") == "one\\ntwo\\x1b[31m"
    shown = paths.quote_path("s3://AKIAX:SecretYYY@bucket/" + "k" * 5000 + "/x.csv")
    assert "SecretYYY" not in shown and len(shown) <= 300 and shown.endswith("/x.csv")


def test_check_within_never_echoes_a_secret_or_megabytes(tmp_path):
    roots = paths.Roots([tmp_path / "root"])
    with pytest.raises(PathNotAllowed) as caught:
        check_within("/elsewhere/" + "p" * 100_000 + ".png", roots, "image")
    assert len(str(caught.value)) < 1000
    with pytest.raises(PathNotAllowed) as caught:
        check_within("s3://bucket/x.csv", paths.Roots(["s3://other"]), "input CSV",
                     shown="s3://bucket/x.csv?X-Amz-Signature=SigZZZ")  # fmt: skip
    assert "SigZZZ" not in str(caught.value)


@pytest.mark.parametrize("target", ["/proc/self/environ", "/sys/kernel/notes", "/dev/null"])
def test_input_csv_in_a_pseudo_file_system_is_refused_whatever_the_roots(monkeypatch, target):
    monkeypatch.setenv("LEAK_CANARY", "sk-canary-77e1")
    for roots in (None, paths.Roots([Path("/")])):
        with pytest.raises(InputError, match=r"is not a regular file .*under /(proc|sys|dev)") as caught:
            paths.check_input_csv(target, roots)
        assert "sk-canary-77e1" not in str(caught.value)
    with pytest.raises(InputError, match=r"not a regular file"):
        validate_csv(target, BuildOptions(), allowed_roots=None)


def test_input_csv_fifo_and_directory_are_refused_by_stat(tmp_path):
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"in\.csv: is not a regular file \(a FIFO; refused\)"):
        paths.check_input_csv(fifo, None)
    with pytest.raises(InputError, match=r"is a directory"):
        paths.check_input_csv(tmp_path, None)
    assert paths.check_input_csv(tmp_path / "missing.csv", None) == tmp_path / "missing.csv"  # open says so


def test_proc_mounted_elsewhere_is_refused(tmp_path, monkeypatch):
    """/proc bind-mounted under another name (as /host/proc in some deployments): refused by its device."""
    import subprocess

    monkeypatch.setenv("LEAK_CANARY", "sk-canary-77e1")
    mnt = tmp_path / "hostproc"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "--bind", "/proc", str(mnt)], capture_output=True).returncode
    ):
        pytest.skip("needs permission to bind-mount /proc")
    try:
        target = mnt / "self" / "environ"
        with pytest.raises(InputError, match=r"on the file system of /proc") as caught:
            validate_csv(target, BuildOptions(), allowed_roots=None)
        assert "sk-canary-77e1" not in str(caught.value)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_link_that_cannot_be_resolved_is_a_clear_input_error(tmp_path):
    target = "/proc/1/root/etc/hostname"
    try:
        os.path.realpath(target)
    except PermissionError:
        pass
    else:
        pytest.skip("here /proc/1/root can be followed")
    link = tmp_path / "in.csv"
    link.symlink_to(target)
    for roots in (None, [tmp_path]):
        with pytest.raises(InputError, match="cannot be resolved"):
            paths.check_input_csv(link, roots)
