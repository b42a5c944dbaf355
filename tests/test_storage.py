"""Local storage backend: early writeback is a hint that never changes bytes or hides errors."""

from __future__ import annotations

import ctypes
import errno

import pytest

from dist_ckpt.manifest import ALIGN
from dist_ckpt.storage import WRITE_PIECE as PIECE
from dist_ckpt.storage import SaveTarget, local
from dist_ckpt.storage.local import LocalStorage, LocalWriteStream
from dist_ckpt.writer import WriteItem, write_items


class Recording(LocalWriteStream):
    def __init__(self, path: str, calls: list) -> None:
        super().__init__(path)
        self.calls = calls

    def start_writeback(self, offset: int, nbytes: int) -> None:
        self.calls.append((self.path, offset, nbytes))
        super().start_writeback(offset, nbytes)


class RecordingStorage(LocalStorage):
    def __init__(self) -> None:
        self.calls: list = []

    def open_stream(self, target: SaveTarget, name: str) -> LocalWriteStream:
        return Recording(f"{target.location}/{name}", self.calls)


def test_writer_starts_writeback_of_every_piece_it_wrote(tmp_path):
    (tmp_path / "data").mkdir()
    big = bytes(range(256)) * ((PIECE + 5000) // 256 + 1)
    items = [WriteItem(0, memoryview(b"x" * 10)), WriteItem(1, memoryview(big)), WriteItem(2, memoryview(b""))]
    storage = RecordingStorage()
    records = write_items(storage, SaveTarget(str(tmp_path), str(tmp_path)), 3, items, threads=1)
    covered = sorted((off, n) for _, off, n in storage.calls)
    by_tag = {r.tag: r for r in records}
    # the 10-byte chunk in one piece, the big one in two, the empty one not at all
    assert covered == [(0, 10), (by_tag[1].offset, PIECE), (by_tag[1].offset + PIECE, len(big) - PIECE)]
    data = (tmp_path / records[1].file).read_bytes()
    assert data[by_tag[1].offset : by_tag[1].offset + len(big)] == big
    assert data[:10] == b"x" * 10


def test_small_chunks_start_their_writeback_together_a_piece_at_a_time(tmp_path):
    """One writeback call per piece's worth of small chunks (a call per chunk was most of the CPU of a save of many small tensors)."""
    (tmp_path / "data").mkdir()
    tiny = [WriteItem(i, memoryview(bytes([i]) * 10)) for i in range(100)]
    mib = [WriteItem(100 + i, memoryview(bytes([i]) * (1 << 20))) for i in range(20)]  # 1 MiB each: back to back, 4 KiB aligned
    for items, want in ((tiny, [(0, 99 * ALIGN + 10)]), (mib, [(0, PIECE), (PIECE, 20 * (1 << 20) - PIECE)])):
        storage = RecordingStorage()
        records = write_items(storage, SaveTarget(str(tmp_path), str(tmp_path)), 3, items, threads=1)
        assert [(off, n) for _, off, n in storage.calls] == want
        data = (tmp_path / records[0].file).read_bytes()
        assert all(data[r.offset : r.offset + r.nbytes] == bytes(i.data) for r, i in zip(records, items))


def test_unsupported_writeback_is_switched_off_for_the_handle(tmp_path, monkeypatch):
    calls = []

    def unsupported(fd, offset, nbytes, flags):
        calls.append(offset)
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(local, "_sync_file_range", unsupported)
    h = LocalWriteStream(str(tmp_path / "f"))
    h.append(memoryview(b"abc"), 0)
    h.start_writeback(0, 3)
    h.start_writeback(0, 3)  # not called again
    h.sync()
    h.close()
    assert calls == [0]
    assert (tmp_path / "f").read_bytes() == b"abc"


@pytest.mark.skipif(local._sync_file_range is None, reason="no sync_file_range on this platform")
def test_writeback_on_a_real_file_keeps_the_bytes(tmp_path):
    h = LocalWriteStream(str(tmp_path / "f"))
    payload = bytes(range(256)) * 64
    h.append(memoryview(payload), 4096)
    h.start_writeback(4096, len(payload))
    h.sync()
    h.close()
    assert (tmp_path / "f").read_bytes()[4096:] == payload


def test_write_atomic_of_several_pieces_lands_whole_and_leaves_no_temporary(tmp_path):
    data = bytes(range(251)) * ((2 * PIECE + 12345) // 251)
    LocalStorage().write_atomic(str(tmp_path / "MANIFEST"), data)
    assert (tmp_path / "MANIFEST").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["MANIFEST"]


class CommitsFirst(LocalStorage):
    """Another save commits at ``target.path`` between this publish's check and its rename."""

    def __init__(self, other) -> None:
        self.other = other

    def _rename_dir(self, src, dst):
        if self.other is not None and src.endswith(".tmp-mine"):
            other, self.other = self.other, None
            super().publish(other, b"theirs")
        super()._rename_dir(src, dst)


class CommitsInsideTheRename(CommitsFirst):
    """Another save commits at ``target.path`` after ``_rename_dir``'s own check, just before its ``rename(2)``.

    The kernel then refuses with ENOTEMPTY, which must mean what the check means (CI once saw it raw).
    """

    def _rename_dir(self, src, dst):
        LocalStorage._rename_dir(self, src, dst)

    def _rename(self, src, dst):
        if self.other is not None and src.endswith(".tmp-mine"):
            other, self.other = self.other, None
            LocalStorage().publish(other, b"theirs")
        super()._rename(src, dst)  # onto their non-empty directory


@pytest.mark.parametrize("racing_storage", [CommitsFirst, CommitsInsideTheRename])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_committed_between_check_and_rename_wins_and_the_loser_is_told(tmp_path, overwrite, racing_storage):
    from dist_ckpt.errors import CheckpointError, CheckpointExists

    storage = LocalStorage()
    path = str(tmp_path / "ck")
    theirs = storage.save_target(path, "theirs", overwrite)
    storage.begin_save(theirs)
    mine = storage.save_target(path, "mine", overwrite)
    racing = racing_storage(theirs)
    racing.begin_save(mine)
    with pytest.raises(CheckpointError if overwrite else CheckpointExists, match="another save" if overwrite else "appeared during the save"):
        racing.publish(mine, b"mine")
    racing.abort(mine)
    assert (tmp_path / "ck" / "MANIFEST").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


_PLUGIN = '''
from dist_ckpt.storage.local import LocalStorage

made = []


class PlugStorage(LocalStorage):
    """A third-party backend: local files, counted, under the plug:// scheme."""

    def __init__(self):
        made.append(self)
'''


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """A package installed in a tmp dir with a dist_ckpt.storage entry point, as pip would leave it."""
    import dist_ckpt.storage as storage_mod

    site = tmp_path / "site"
    (site / "plugpkg").mkdir(parents=True)
    (site / "plugpkg" / "__init__.py").write_text(_PLUGIN)
    info = site / "plugpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dist_ckpt.storage]\nplug = plugpkg:PlugStorage\nbroken = plugpkg_missing:Nothing\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    for scheme in ("plug", "broken"):
        storage_mod._BACKENDS.pop(scheme, None)  # loaded entry points register themselves


def test_a_backend_installed_through_the_entry_point_group_serves_save_and_load(plugin_on_path, tmp_path):
    import torch

    import dist_ckpt as dc
    from dist_ckpt.storage import get_storage, supported_schemes

    assert {"file", "plug", "broken"} <= set(supported_schemes())
    storage, path = get_storage("plug:///some/where")
    assert type(storage).__name__ == "PlugStorage" and path == "/some/where"
    ck = f"plug://{tmp_path}/ck"
    dc.save({"w": torch.arange(6.0)}, ck)  # the coordinator resolves the scheme through the same registry
    assert (tmp_path / "ck" / "MANIFEST").is_file()
    assert torch.equal(dc.load({"w": torch.zeros(6)}, ck)["w"], torch.arange(6.0))
    import plugpkg

    assert len(plugpkg.made) >= 3  # the coordinator's, the writer's and the loader's


def test_an_entry_point_that_fails_to_load_is_refused_naming_it(plugin_on_path):
    from dist_ckpt.errors import UnsupportedScheme
    from dist_ckpt.storage import get_storage

    with pytest.raises(UnsupportedScheme, match=r"broken://.*plugpkg_missing:Nothing.*failed to load"):
        get_storage("broken://x")
    with pytest.raises(UnsupportedScheme, match=r"no storage backend for nope://.*plug://"):
        get_storage("nope://x")


def test_a_stream_only_appends_at_aligned_offsets_past_its_end(tmp_path):
    stream = LocalWriteStream(str(tmp_path / "f"))
    stream.append(memoryview(b"abc"), 0)
    with pytest.raises(ValueError, match="append at 0 but the stream ends at 3"):
        stream.append(memoryview(b"x"), 0)  # going back would need a seek an upload cannot do
    with pytest.raises(ValueError, match="aligned"):
        stream.append(memoryview(b"x"), 4097)
    stream.append(memoryview(b"def"), 8192)  # a gap is fine: it reads as zeros
    stream.sync()
    stream.close()
    data = (tmp_path / "f").read_bytes()
    assert data[:3] == b"abc" and data[3:8192] == bytes(8189) and data[8192:] == b"def"


class RemovalFails(LocalStorage):
    def remove_tree(self, path):
        raise OSError(errno.EMFILE, "Too many open files")


def test_uncommit_unpublishes_before_it_removes_so_a_failed_removal_leaves_no_checkpoint(tmp_path):
    storage = LocalStorage()
    path = str(tmp_path / "ck")
    target = storage.save_target(path, "s1", False)
    storage.begin_save(target)
    storage.publish(target, b"manifest")
    with pytest.raises(OSError, match="Too many open files"):
        RemovalFails().uncommit(path)
    left = [p.name for p in tmp_path.iterdir()]
    assert not (tmp_path / "ck").exists() and len(left) == 1 and left[0].startswith("ck.tmp-delete-")  # garbage, not a checkpoint
    storage.uncommit(str(tmp_path / left[0]))  # what gc does with the leftover
    storage.uncommit(path)  # nothing there: not an error
    assert list(tmp_path.iterdir()) == []


class AppendRecording(LocalWriteStream):
    def __init__(self, path: str, calls: list) -> None:
        super().__init__(path)
        self.calls = calls

    def append(self, data, offset: int) -> None:
        self.calls.append((offset, len(memoryview(data).cast("B"))))
        super().append(data, offset)


def test_writer_appends_each_block_as_soon_as_it_is_hashed(tmp_path):
    """Appends of one block each (the block just hashed, still in the CPU cache), not of whole pieces."""
    from dist_ckpt.manifest import BLOCK_BYTES

    (tmp_path / "data").mkdir()
    calls: list = []

    class Storage(LocalStorage):
        def open_stream(self, target: SaveTarget, name: str) -> LocalWriteStream:
            return AppendRecording(f"{target.location}/{name}", calls)

    big = bytes(range(256)) * ((PIECE + 5000) // 256 + 1)
    (record,) = write_items(Storage(), SaveTarget(str(tmp_path), str(tmp_path)), 0, [WriteItem(0, memoryview(big))], threads=1)
    assert calls == [(record.offset + b, min(BLOCK_BYTES, len(big) - b)) for b in range(0, len(big), BLOCK_BYTES)]
    assert (tmp_path / record.file).read_bytes()[: len(big)] == big
