"""Run folder names: safe, readable, and one folder per run id (issue: runs whose ids differ only in
punctuation shared a folder and overwrote each other's results)."""

import pytest

from batchpipe.naming import safe_name, unique_name


def test_safe_ids_stay_as_they_are():
    for text in ("demo__20261130T052727", "nightly", "run-1.2_x"):
        assert unique_name(text) == text


@pytest.mark.parametrize(
    "group",
    [
        ["batch:1", "batch+1", "batch_1", "batch 1", "batch/1", "batch\\1"],
        ["nightly.", "nightly", ".nightly", "_nightly_"],
        ["", ".", "..", "...", "run", "_", "ü", "日本"],
        ["manual__2026-11-30T05:00:00+00:00", "manual__2026-11-30T05_00_00_00_00"],
    ],
)
def test_ids_that_differ_only_in_punctuation_get_different_folders(group):
    names = [unique_name(t) for t in group]
    assert len(set(names)) == len(group), names
    for name in names:
        assert name not in ("", ".", "..") and "/" not in name and "\\" not in name
        assert safe_name(name) == name  # the result is itself safe


def test_the_readable_part_stays():
    assert unique_name("manual__2026-11-30T05:00:00+00:00").startswith("manual__2026-11-30T05_00_00_00_00-")
    assert len(unique_name("batch:1")) == len("batch_1") + 9


def test_no_chosen_id_can_take_another_ids_folder_and_long_ids_fit():
    hashed = unique_name("batch:1")
    assert unique_name(hashed) != hashed  # an id that looks hashed is hashed again
    long_ids = ["a:" * 125, "a+" * 125, "b" * 250, "b" * 249 + "c"]
    names = [unique_name(t) for t in long_ids]
    assert len(set(names)) == 4 and all(len(n) <= 200 for n in names)
    assert unique_name("x" * 300, max_len=40) != unique_name("x" * 301, max_len=40)
    assert len(unique_name("x" * 300, max_len=40)) == 40
