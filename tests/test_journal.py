"""The one crash-safety layer: record logs (torn tails, truncation), atomic writes, the memory limit."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import pytest

from lblctl.core import journal
from lblctl.core.artifacts import atomic_write_text
from lblctl.core.journal import RecordLog, read_log, scan
from lblctl.core.runtime import available_memory


def test_record_log_appends_and_drops_a_torn_or_damaged_tail(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RecordLog(path, b"test") as log:
        assert log.empty and log.records == []
        offsets = [log.append(1, b"alpha"), log.append(2, memoryview(b"be"), b"ta"), log.append(1, b"")]
        assert log.read_at(offsets[1]) == (2, b"beta")
    assert [(t, bytes(p)) for t, p in read_log(path, b"test")] == [(1, b"alpha"), (2, b"beta"), (1, b"")]
    assert read_log(path, b"other") == []  # another log's kind is not replayed
    data = path.read_bytes()
    path.write_bytes(data[: offsets[2] + 5])  # the last record cut short
    with RecordLog(path, b"test") as log:
        assert [bytes(p) for _, p in log.records] == [b"alpha", b"beta"]
        assert log.torn_bytes == 5 and path.stat().st_size == offsets[2]  # cut off where it began
        log.append(3, b"gamma")
    damaged = bytearray(path.read_bytes())
    damaged[offsets[1] + 16] ^= 0xFF  # one flipped payload byte: that record and all after are dropped
    records, end = scan(bytes(damaged), b"test")
    assert [bytes(p) for _, p, _ in records] == [b"alpha"] and end == offsets[1]
    inode, size = path.stat().st_ino, path.stat().st_size
    with RecordLog(path, b"test") as log:
        log.reset()
        assert log.empty and path.stat().st_ino == inode
        assert path.stat().st_size == size  # emptied by a new epoch: the file keeps its pages to overwrite
    assert read_log(path, b"test") == []


def test_a_reset_log_is_rewritten_in_place_and_its_old_records_never_come_back(tmp_path: Path) -> None:
    """Issue 18: a reset keeps the file (rewriting a truncated file's pages cost ~18× more here); the older
    epoch's records that follow the new ones are rejected, even where they start at a record boundary."""
    path = tmp_path / "x.log"
    with RecordLog(path, b"test") as log:
        for i in range(4):
            log.append(1, bytes([i]) * 100)  # equal sizes: every old record starts where a new one ends
        log.reset()
        log.append(1, b"\x07" * 100)
        size = path.stat().st_size
    assert [bytes(p) for _, p in read_log(path, b"test")] == [b"\x07" * 100]
    with RecordLog(path, b"test") as log:  # reopened: appends go after the new record, over the old ones
        assert [bytes(p) for _, p in log.records] == [b"\x07" * 100] and log.torn_bytes == 0
        log.append(1, b"\x08" * 100)
    assert [bytes(p) for _, p in read_log(path, b"test")] == [b"\x07" * 100, b"\x08" * 100]
    assert path.stat().st_size == size


def test_a_log_of_the_first_format_is_read_and_appended_to_until_its_reset(tmp_path: Path) -> None:
    """A log left by a killed run of the first format (no epoch) is still replayed after an upgrade."""
    path = tmp_path / "old.log"

    def v1_record(rtype: int, payload: bytes) -> bytes:
        crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", rtype, len(payload))))
        return struct.pack("<IQI", rtype, len(payload), crc) + payload

    path.write_bytes(b"LBLLOG01" + b"test".ljust(8, b"\0") + v1_record(1, b"alpha") + v1_record(2, b"beta")[:-1])
    assert [(t, bytes(p)) for t, p in read_log(path, b"test")] == [(1, b"alpha")]
    with RecordLog(path, b"test") as log:
        assert [bytes(p) for _, p in log.records] == [b"alpha"] and log.torn_bytes > 0
        log.append(2, b"beta")
    assert [(t, bytes(p)) for t, p in read_log(path, b"test")] == [(1, b"alpha"), (2, b"beta")]
    assert path.read_bytes()[:8] == b"LBLLOG01"
    with RecordLog(path, b"test") as log:
        log.reset()
        log.append(3, b"gamma")
    assert [(t, bytes(p)) for t, p in read_log(path, b"test")] == [(3, b"gamma")]
    assert path.read_bytes()[:8] == b"LBLLOG02"


def test_atomic_write_never_touches_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: setting the umask to 0 for a moment races with files other threads create."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(journal, "_UMASK", journal._read_umask())

        def no_umask(mask: int) -> int:
            raise AssertionError("os.umask called while writing")

        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert (tmp_path / "a.txt").read_text() == "hello"


def _fake_proc(root: Path, avail_kib: int, cgroup_line: str) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {avail_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    return proc


def test_available_memory_honours_cgroup_v2_and_v1_limits(tmp_path: Path) -> None:
    gib = 1 << 30
    # v2: 4 GiB limit, 3 GiB used of which 1 GiB is inactive page cache → 2 GiB headroom
    proc = _fake_proc(tmp_path / "v2", 16 * 2**20, "0::/job")
    cg = tmp_path / "v2" / "cg"
    (cg / "job").mkdir(parents=True)
    (cg / "job" / "memory.max").write_text(f"{4 * gib}\n")
    (cg / "job" / "memory.current").write_text(f"{3 * gib}\n")
    (cg / "job" / "memory.stat").write_text(f"anon 123\ninactive_file {gib}\n")
    assert available_memory(proc, cg) == 2 * gib
    (cg / "job" / "memory.max").write_text("max\n")  # no limit: the host's MemAvailable
    assert available_memory(proc, cg) == 16 * gib
    # v1: a parent's tighter limit wins; the host figure wins when it is lower
    proc = _fake_proc(tmp_path / "v1", 16 * 2**20, "4:memory:/pod/box")
    cg = tmp_path / "v1" / "cg"
    (cg / "memory" / "pod" / "box").mkdir(parents=True)
    (cg / "memory" / "pod" / "box" / "memory.limit_in_bytes").write_text(str(8 * gib))
    (cg / "memory" / "pod" / "box" / "memory.usage_in_bytes").write_text(str(gib))
    (cg / "memory" / "pod" / "memory.limit_in_bytes").write_text(str(3 * gib))
    (cg / "memory" / "pod" / "memory.usage_in_bytes").write_text(str(2 * gib))
    (cg / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # the root: unlimited
    assert available_memory(proc, cg) == gib
    proc = _fake_proc(tmp_path / "v1b", 512 * 1024, "4:memory:/pod/box")
    assert available_memory(proc, cg) == gib // 2
