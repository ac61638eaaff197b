"""Large payloads by shared memory (handlers/sharedmem.py): the front door's files and the handler's checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handlers import codec, sharedmem
from handlers.sharedmem import PREFIX, PayloadArea, PayloadRefError


@pytest.fixture
def area(tmp_path: Path) -> PayloadArea:
    opened = PayloadArea.open(str(tmp_path), 1)
    assert opened is not None
    return opened


def test_a_payload_written_by_the_front_door_maps_back_to_the_same_tensors(area: PayloadArea) -> None:
    x = np.random.default_rng(0).standard_normal((256, 3, 8, 8)).astype(np.float32)
    placed = area.write(codec.encode_parts({"input": x}))
    assert placed is not None
    path, nbytes = placed
    assert nbytes == len(codec.encode({"input": x}))
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(area.directory).st_mode & 0o777 == 0o700
    ref = codec.decode(codec.encode_ref(path, nbytes)).ref
    assert ref == codec.Ref(path, nbytes)
    got = codec.decode(sharedmem.load(ref.path, ref.nbytes)).tensors["input"]
    np.testing.assert_array_equal(got, x)
    got += 1  # copy-on-write: the handler may write (torch wants a writable array), the file does not change
    np.testing.assert_array_equal(codec.decode(Path(path).read_bytes()).tensors["input"], x)
    PayloadArea.remove(path)
    assert not Path(path).exists()
    area.close()
    assert not area.directory.exists()


def test_the_handler_maps_only_files_of_a_payload_directory(area: PayloadArea, tmp_path: Path) -> None:
    placed = area.write([b"GSv1", b"x" * 100])
    assert placed is not None
    path, nbytes = placed
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * nbytes)
    link = area.directory / "link"
    link.symlink_to(outside)
    subdir = area.directory / "sub"
    subdir.mkdir()
    for bad, says in [(str(outside), "not a file of a gradserve front door"),
                      ("relative/" + PREFIX + "1/0", "not a file of a gradserve front door"),
                      (str(area.directory / ".." / area.directory.name / "0"), "not a file of a gradserve"),
                      (str(link), "not a file of a gradserve front door"),
                      (str(area.directory / "missing"), "cannot be opened"),
                      (str(subdir), "not a regular file")]:
        with pytest.raises(PayloadRefError, match=says):
            sharedmem.load(bad, nbytes)
    with pytest.raises(PayloadRefError, match=f"has {nbytes} bytes, the reference says {nbytes + 1}"):
        sharedmem.load(path, nbytes + 1)
    assert bytes(sharedmem.load(path, nbytes)[:4]) == b"GSv1"


def test_a_write_that_fails_goes_inline_and_leaves_no_file(area: PayloadArea, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    real_write = os.write

    def full(fd: int, data: memoryview) -> int:  # a full /dev/shm: the first part fits, the second does not
        if len(data) > 4:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sharedmem.os, "write", full)
    assert area.write([b"GSv1", b"x" * 10]) is None
    assert list(area.directory.iterdir()) == []
    assert "No space left on device" in caplog.text and "a larger /dev/shm" in caplog.text
    monkeypatch.undo()
    assert area.write([b"GSv1", b"x" * 10]) is not None  # the area still works


def test_no_area_when_off_or_when_the_base_cannot_hold_one(tmp_path: Path) -> None:
    assert PayloadArea.open(str(tmp_path), 0) is None
    assert PayloadArea.open("", 1024) is None
    assert PayloadArea.open(str(tmp_path / "missing"), 1024) is None


def test_a_dead_front_doors_directory_is_removed_at_the_next_start(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = tmp_path / f"{PREFIX}{gone.stdout.strip()}-abc"
    orphan.mkdir()
    (orphan / "0").write_bytes(b"left by a killed front door")
    live = tmp_path / f"{PREFIX}{os.getppid()}-abc"  # a process that is alive
    live.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    area = PayloadArea.open(str(tmp_path), 1)
    assert area is not None
    assert not orphan.exists() and live.exists() and other.exists() and area.directory.exists()


def test_a_released_file_carries_the_next_payload_of_its_size_and_idle_files_are_capped(
        area: PayloadArea, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing into a file tmpfs already holds costs a fifth of creating and removing one: a file whose call
    ended carries the next payload of exactly its size (never truncated: a late reader cannot fault past its end);
    other sizes get files of their own; idle files beyond KEEP_IDLE_BYTES are removed, oldest first."""
    a, b = (np.full((4, 3), v, np.float32) for v in (1.0, 2.0))
    first = area.write(codec.encode_parts({"input": a}))
    assert first is not None
    area.release(*first)
    again = area.write(codec.encode_parts({"input": b}))
    assert again == first  # the same file, now holding b
    np.testing.assert_array_equal(codec.decode(sharedmem.load(*again)).tensors["input"], b)
    other = area.write(codec.encode_parts({"input": np.zeros((5, 3), np.float32)}))
    assert other is not None and other[0] != first[0]
    monkeypatch.setattr(sharedmem, "KEEP_IDLE_BYTES", again[1] + other[1] - 1)
    area.release(*again)
    area.release(*other)  # both idle would be one byte too many: the older one goes
    assert sorted(p.name for p in area.directory.iterdir()) == [Path(other[0]).name]
    big = area.write([b"GSv1", b"x" * (again[1] + other[1])])
    assert big is not None
    area.release(*big)  # bigger than what may stay idle: removed at once
    assert not Path(big[0]).exists()
