import os

from fixative.daemon.stability import Settled, StabilityTracker


def _write(path, data, mtime_ns):
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_quiet_unchanged_file_settles_once(tmp_path):
    image = tmp_path / "a.png"
    _write(image, b"abc", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(image, now=100)

    assert tracker.ready(now=104.9) == []
    assert tracker.ready(now=105) == [Settled(image, 3, 1_000)]
    assert tracker.ready(now=200) == []
    assert len(tracker) == 0


def test_every_event_restarts_the_quiet_period(tmp_path):
    image = tmp_path / "a.png"
    _write(image, b"abc", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(image, now=100)
    tracker.touch(image, now=104)

    assert tracker.ready(now=108) == []
    assert [s.path for s in tracker.ready(now=109)] == [image]


def test_a_change_without_an_event_restarts_the_quiet_period(tmp_path):
    # A writer on a network share, or one whose events were lost, changes the
    # file with no event reaching us; the stat comparison is what catches it.
    image = tmp_path / "a.png"
    _write(image, b"abc", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(image, now=100)
    _write(image, b"abcdef", 2_000)

    assert tracker.ready(now=105) == []
    assert tracker.ready(now=109) == []
    assert tracker.ready(now=110) == [Settled(image, 6, 2_000)]


def test_a_same_size_rewrite_is_caught_by_the_mtime(tmp_path):
    image = tmp_path / "a.png"
    _write(image, b"abc", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(image, now=100)
    _write(image, b"xyz", 2_000)

    assert tracker.ready(now=105) == []
    # Still tracked, from the new stat: a tracker that dropped changed files
    # would never queue a file rewritten in place.
    assert len(tracker) == 1
    assert tracker.ready(now=110) == [Settled(image, 3, 2_000)]


def test_a_file_that_vanishes_is_dropped(tmp_path):
    partial = tmp_path / "a.png.part"
    _write(partial, b"abc", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(partial, now=100)
    partial.unlink()

    assert tracker.ready(now=105) == []
    assert len(tracker) == 0


def test_a_file_gone_before_its_event_is_handled_is_dropped(tmp_path):
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(tmp_path / "never.png", now=100)

    assert tracker.ready(now=105) == []
    assert len(tracker) == 0


def test_files_settle_independently(tmp_path):
    early, late = tmp_path / "early.png", tmp_path / "late.png"
    _write(early, b"1", 1_000)
    _write(late, b"2", 1_000)
    tracker = StabilityTracker(stability_seconds=5)
    tracker.touch(early, now=100)
    tracker.touch(late, now=103)

    assert [s.path for s in tracker.ready(now=105)] == [early]
    assert [s.path for s in tracker.ready(now=108)] == [late]
