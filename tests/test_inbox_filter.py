import os
from pathlib import Path

import pytest

from fixative.daemon.inbox_filter import WatcherConfigError, check_folders, ignore_reason, refusal_reason

INBOX = Path("/home/artist/ToProtect")


@pytest.mark.parametrize(
    "relative",
    ["a.png", "A.PNG", "b.jpg", "c.jpeg", "d.webp", "e.tif", "f.tiff", "g.bmp", "h.gif", "sub/deeper/i.png", "my art.png"],
)
def test_images_are_candidates(relative):
    assert ignore_reason(INBOX / relative, INBOX) is None


@pytest.mark.parametrize(
    ("relative", "why"),
    [
        (".hidden.png", "hidden"),
        (".DS_Store", "hidden"),
        ("._a.png", "hidden"),  # macOS resource fork on SMB/FAT
        (".stfolder/a.png", "hidden"),
        (".Trash-1000/files/a.png", "hidden"),
        ("sub/.a.png.swp", "hidden"),
        ("Thumbs.db", "junk"),
        ("desktop.ini", "junk"),
        ("@eaDir/a.png/SYNOFILE_THUMB_M.jpg", "junk"),
        ("a.png.part", "temporary"),
        ("a.png.crdownload", "temporary"),
        ("a.tmp", "temporary"),
        ("a.png.swp", "temporary"),
        ("a.png~", "backup"),
        ("notes.txt", "not an image"),
        ("picture.psd", "not an image"),
        ("README", "not an image"),
    ],
)
def test_ignored_paths_say_why(relative, why):
    assert why in ignore_reason(INBOX / relative, INBOX)


def test_a_hidden_inbox_location_does_not_hide_its_files():
    inbox = Path("/home/artist/.local/inbox")
    assert ignore_reason(inbox / "a.png", inbox) is None


def test_paths_outside_the_inbox_are_not_candidates():
    assert ignore_reason(Path("/etc/a.png"), INBOX) == "outside the inbox"
    assert ignore_reason(INBOX, INBOX) is not None


def test_a_regular_file_in_the_inbox_is_accepted(tmp_path):
    (tmp_path / "sub").mkdir()
    image = tmp_path / "sub" / "a.png"
    image.write_bytes(b"x")
    assert refusal_reason(image, tmp_path) is None


def test_a_symlink_is_refused_even_when_it_points_inside(tmp_path):
    (tmp_path / "real.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert "symlink" in refusal_reason(tmp_path / "link.png", tmp_path)


def test_a_file_behind_a_symlinked_folder_is_refused(tmp_path):
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(b"x")
    (inbox / "door").symlink_to(elsewhere)
    assert "outside the inbox" in refusal_reason(inbox / "door" / "secret.png", inbox)


def test_a_fifo_and_a_device_are_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert "FIFO" in refusal_reason(tmp_path / "pipe.png", tmp_path)
    assert "character device" in refusal_reason(Path("/dev/null"), Path("/dev"))
    assert "directory" in refusal_reason(tmp_path, tmp_path.parent)


def test_a_vanished_file_raises_rather_than_being_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        refusal_reason(tmp_path / "gone.png", tmp_path)


def test_separate_folders_pass(tmp_path):
    check_folders(tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize(
    ("inbox", "export", "message"),
    [
        ("in", "in/out", "inside the inbox"),
        ("in", "in", "same folder"),
        ("out/in", "out", "inside export_dir"),
    ],
)
def test_overlapping_folders_are_refused(tmp_path, inbox, export, message):
    with pytest.raises(WatcherConfigError, match=message):
        check_folders(tmp_path / inbox, tmp_path / export)


def test_a_symlink_cannot_hide_an_export_folder_inside_the_inbox(tmp_path):
    (tmp_path / "in" / "out").mkdir(parents=True)
    (tmp_path / "looks-elsewhere").symlink_to(tmp_path / "in" / "out")
    with pytest.raises(WatcherConfigError, match="inside the inbox"):
        check_folders(tmp_path / "in", tmp_path / "looks-elsewhere")
