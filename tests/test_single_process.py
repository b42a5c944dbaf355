"""Save and load in one process, no process group (world of one)."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

import dist_ckpt as dc
from dist_ckpt.commit import MANIFEST
from dist_ckpt.loader import read_manifest

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float32 if not dtype.is_complex else torch.complex64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.view(torch.uint8) if a.element_size() == 1 and a.dtype != torch.bool else a,
            b.view(torch.uint8) if b.element_size() == 1 and b.dtype != torch.bool else b,
        )
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips(tmp_path, dtype):
    sd = {"t": sample(dtype, (17, 5)), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 4))}
    dc.save(sd, str(tmp_path / "ck"))
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dc.load(out, str(tmp_path / "ck"))
    for k in sd:
        assert same(out[k], sd[k]), k


def test_non_contiguous_tensors(tmp_path):
    base = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    sd = {"transpose": base.t(), "slice": base[3:9, 5:17], "strided": base[::3, ::2], "offset_view": base.view(-1)[101:160]}
    dc.save(sd, str(tmp_path / "ck"))
    out = {k: torch.zeros(v.shape) for k, v in sd.items()}
    dc.load(out, str(tmp_path / "ck"))
    for k in sd:
        assert torch.equal(out[k], sd[k]), k


def test_load_into_non_contiguous_target(tmp_path):
    src = torch.arange(12.0).reshape(3, 4)
    dc.save({"x": src}, str(tmp_path / "ck"))
    target = torch.zeros(4, 3).t()
    dc.load({"x": target}, str(tmp_path / "ck"))
    assert torch.equal(target, src)


def test_objects_and_nesting_round_trip(tmp_path):
    sd = {
        "step": 7,
        "name": "run",
        "blob": b"\x00\x01",
        "none": None,
        "flag": True,
        "lr": 1e-3,
        "opt": {"state": {0: {"m": torch.ones(2)}, 1: {"m": torch.zeros(2)}}, "param_groups": [{"params": [0, 1], "betas": (0.9, 0.99)}]},
        "empty": {},
        "elist": [],
    }
    dc.save(sd, str(tmp_path / "ck"))
    with dc.make_sync_checkpointer() as ck:
        full = ck.load(str(tmp_path / "ck"))
    assert full["opt"]["param_groups"] == [{"params": [0, 1], "betas": (0.9, 0.99)}]
    assert list(full["opt"]["state"]) == [0, 1] and torch.equal(full["opt"]["state"][1]["m"], torch.zeros(2))
    assert full["empty"] == {} and full["elist"] == [] and full["blob"] == b"\x00\x01" and full["none"] is None
    target = {
        "step": 0,
        "name": "",
        "blob": b"",
        "none": 1,
        "flag": False,
        "lr": 0.0,
        "opt": {"state": {0: {"m": torch.zeros(2)}, 1: {"m": torch.ones(2)}}, "param_groups": [{"params": [9, 9], "betas": (0, 0)}]},
        "empty": {},
        "elist": [],
    }
    dc.load(target, str(tmp_path / "ck"))
    assert target["step"] == 7 and target["opt"]["param_groups"][0]["betas"] == (0.9, 0.99) and target["flag"] is True


class Opaque:
    def __init__(self, v):
        self.v = v


def test_non_native_value_refused_with_key_path(tmp_path):
    with pytest.raises(dc.StateDictError, match=r"extra\.cfg.*Opaque.*allow_pickle"):
        dc.save({"extra": {"cfg": Opaque(1)}}, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()


def test_pickle_is_opt_in_on_save_and_on_load(tmp_path):
    ck = dc.make_sync_checkpointer(dc.Config(allow_pickle=True))
    ck.save(str(tmp_path / "ck"), {"cfg": Opaque(41), "w": torch.ones(1)})
    ck.close()
    with pytest.raises(dc.PickleNotAllowed, match="cfg.*allow_pickle"):
        dc.load({"cfg": None, "w": torch.zeros(1)}, str(tmp_path / "ck"))
    out = dc.load({"cfg": None, "w": torch.zeros(1)}, str(tmp_path / "ck"), allow_pickle=True)
    assert out["cfg"].v == 41


def test_checkpoint_holds_no_pickle_or_zip(tmp_path):
    dc.save({"w": torch.randn(64, 64), "step": 1}, str(tmp_path / "ck"))
    for root, _, files in os.walk(tmp_path / "ck"):
        for f in files:
            p = os.path.join(root, f)
            data = open(p, "rb").read()
            assert not zipfile.is_zipfile(p), p
            assert not data.startswith(b"\x80") or f != MANIFEST, p  # pickle protocol 2+ starts with \x80
    m, _, _ = read_manifest(str(tmp_path / "ck"))
    assert all(f.startswith("data/") and f.endswith(".bin") for f in m.files)


def test_chunks_are_4k_aligned(tmp_path):
    dc.save({f"t{i}": torch.randn(i + 1, 3) for i in range(10)}, str(tmp_path / "ck"))
    m, _, _ = read_manifest(str(tmp_path / "ck"))
    for e in m.tensors.values():
        assert (e.chunks.offset % 4096 == 0).all()


def test_existing_checkpoint_is_never_overwritten_in_place(tmp_path):
    path = str(tmp_path / "ck")
    dc.save({"w": torch.ones(3)}, path)
    with pytest.raises(dc.CheckpointError, match="already exists"):
        dc.save({"w": torch.zeros(3)}, path)
    out = dc.load({"w": torch.zeros(3)}, path)
    assert torch.equal(out["w"], torch.ones(3))
    dc.save({"w": torch.full((3,), 2.0)}, path, overwrite=True)
    assert torch.equal(dc.load({"w": torch.zeros(3)}, path)["w"], torch.full((3,), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_existing_checkpoint_raises_checkpoint_exists_not_planning_failed(tmp_path):
    """The user's choice (pass overwrite=True) reaches them by type and in plain words."""
    path = str(tmp_path / "ck")
    dc.save({"w": torch.ones(3)}, path)
    with pytest.raises(dc.CheckpointExists, match="already exists; pass overwrite=True") as info:
        dc.save({"w": torch.zeros(3)}, path)
    assert isinstance(info.value, FileExistsError) and "planning failed" not in str(info.value)
    assert info.value.failures and path in info.value.failures[0]


def test_interrupted_save_leaves_previous_loadable(tmp_path, monkeypatch):
    """A crash before the rename: the old checkpoint loads and the new path has no MANIFEST."""
    from dist_ckpt.storage.local import LocalStorage

    path = str(tmp_path / "ck")
    dc.save({"w": torch.ones(3)}, path)

    class CrashBeforeRename(LocalStorage):  # the local backend's directory rename fails
        def _rename_dir(self, src, dst):
            raise OSError(5, "simulated crash before rename")

    crashing = CrashBeforeRename()
    with pytest.raises(dc.CheckpointError, match="simulated crash"):
        dc.save({"w": torch.zeros(3)}, str(tmp_path / "new"), storage=crashing)
    with pytest.raises(dc.CheckpointError):
        dc.save({"w": torch.zeros(3)}, path, overwrite=True, storage=crashing)
    assert not (tmp_path / "new").exists()
    assert torch.equal(dc.load({"w": torch.zeros(3)}, path)["w"], torch.ones(3))
    with pytest.raises(dc.CheckpointNotFound, match="no checkpoint"):
        dc.load({"w": torch.zeros(3)}, str(tmp_path / "new"))


def test_crash_between_overwrite_renames_falls_back_to_old(tmp_path):
    path = tmp_path / "ck"
    dc.save({"w": torch.ones(3)}, str(path))
    os.rename(path, tmp_path / "ck.old-abc")  # the state after the first rename of a swap
    out = dc.load({"w": torch.zeros(3)}, str(path))
    assert torch.equal(out["w"], torch.ones(3))


def test_incomplete_checkpoint_is_not_loaded(tmp_path):
    (tmp_path / "ck" / "data").mkdir(parents=True)
    with pytest.raises(dc.CheckpointNotFound, match="incomplete"):
        dc.load({}, str(tmp_path / "ck"))
    with pytest.raises(FileNotFoundError):
        dc.load({}, str(tmp_path / "absent"))


def test_strict_load_lists_missing_and_unexpected(tmp_path):
    dc.save({"a": torch.ones(2), "b": 1}, str(tmp_path / "ck"))
    with pytest.raises(dc.LoadMismatchError, match=r"missing from the checkpoint: c.*not the target: b"):
        dc.load({"a": torch.zeros(2), "c": torch.zeros(1)}, str(tmp_path / "ck"))
    out = dc.load({"a": torch.zeros(2), "c": torch.zeros(1)}, str(tmp_path / "ck"), strict=False)
    assert torch.equal(out["a"], torch.ones(2))


def test_shape_and_dtype_mismatch_name_the_key(tmp_path):
    dc.save({"a": torch.ones(2, 3)}, str(tmp_path / "ck"))
    with pytest.raises(dc.LoadMismatchError, match=r"a: checkpoint has float32 \[2, 3\], target is float32 \[3, 2\]"):
        dc.load({"a": torch.zeros(3, 2)}, str(tmp_path / "ck"))
    with pytest.raises(dc.LoadMismatchError, match="float64"):
        dc.load({"a": torch.zeros(2, 3, dtype=torch.float64)}, str(tmp_path / "ck"))


def test_module_and_optimizer_load_through_their_methods(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    dc.save({"model": model, "optim": opt, "step": 1}, str(tmp_path / "ck"))
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2(torch.randn(3, 4)).sum().backward()
    opt2.step()
    sd = {"model": model2, "optim": opt2, "step": 0}
    dc.load(sd, str(tmp_path / "ck"))
    assert sd["step"] == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 0.01
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_async_save_snapshot_is_taken_at_stage_time(tmp_path):
    ck = dc.make_async_checkpointer()
    try:
        t = torch.ones(1000)
        stage_f, write_f = ck.save(str(tmp_path / "ck"), {"t": t})
        stage_f.result()
        t.fill_(7.0)  # mutate after staging: the checkpoint must hold the ones
        write_f.result(timeout=60)
    finally:
        ck.close()
    assert torch.equal(dc.load({"t": torch.zeros(1000)}, str(tmp_path / "ck"))["t"], torch.ones(1000))


def test_crash_fallback_picks_the_newest_old_copy_not_the_first_by_name(tmp_path):
    dc.save({"w": torch.full((3,), 1.0)}, str(tmp_path / "a"))
    dc.save({"w": torch.full((3,), 2.0)}, str(tmp_path / "b"))
    os.rename(tmp_path / "a", tmp_path / "ck.old-aaa")  # older, first by name
    os.rename(tmp_path / "b", tmp_path / "ck.old-zzz")
    old = os.stat(tmp_path / "ck.old-zzz" / "MANIFEST").st_mtime - 60
    os.utime(tmp_path / "ck.old-aaa" / "MANIFEST", (old, old))
    out = dc.load({"w": torch.zeros(3)}, str(tmp_path / "ck"))
    assert torch.equal(out["w"], torch.full((3,), 2.0))


_OVERWRITER = """
import sys, torch, dist_ckpt as dc
path, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(first, first + n):
    try:
        dc.save({"t": torch.full((64, 256), float(i)), "u": torch.full((4096,), float(i)), "i": i}, path, overwrite=True)
    except dc.CheckpointError as e:  # another writer swapped in at the same moment: this save did not commit
        assert "another save" in str(e), e
"""


def test_loads_racing_overwrites_return_one_checkpoint_whole_and_leave_no_old_copies(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "ck")
    dc.save({"t": torch.zeros(64, 256), "u": torch.zeros(4096), "i": 0}, path)
    writers = [subprocess.Popen([sys.executable, "-c", _OVERWRITER, path, str(first), "25"]) for first in (1, 1001)]
    loads = changed = 0
    while any(w.poll() is None for w in writers) and loads < 2000:
        sd = {"t": torch.zeros(64, 256), "u": torch.zeros(4096), "i": -1}
        try:
            dc.load(sd, path, verify_checksums=False)  # unchecked bytes: a mix would go unnoticed but for the version check
        except dc.CheckpointChanged:
            changed += 1
            continue
        loads += 1
        i = float(sd["i"])
        assert bool((sd["t"] == i).all()) and bool((sd["u"] == i).all()), f"load {loads} mixed two saves: object i={i}, t={sd['t'][0, 0]}, u={sd['u'][0]}"
    for w in writers:
        assert w.wait(timeout=120) == 0
    assert loads > 0
    assert sorted(os.listdir(tmp_path)) == ["ck"], os.listdir(tmp_path)  # no .old-* or .tmp-* left by racing swaps
    sd = dc.load({"t": torch.zeros(64, 256), "u": torch.zeros(4096), "i": -1}, path)
    assert bool((sd["t"] == float(sd["i"])).all())


_LEFT_OPEN = """
import atexit, sys, threading
# Registered before dist_ckpt is imported, so it runs after dist_ckpt's own exit hooks.
atexit.register(lambda: print("LEFT", sorted(t.name for t in threading.enumerate() if t.name.startswith(("dist_ckpt-agent", "dist_ckpt-coord")))))
import torch, dist_ckpt as dc
dc.save({"w": torch.ones(2)}, sys.argv[1])
dc.make_sync_checkpointer().load(sys.argv[1])  # a checkpointer nobody closes
"""


def test_checkpointers_left_open_are_closed_at_interpreter_exit(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", _LEFT_OPEN, str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LEFT []" in out.stdout, out.stdout + out.stderr[-3000:]


def _noting_storage(fail_name: str | None = None):
    """A local storage that notes which thread opened each data file, and fails the writes of ``fail_name``."""
    import threading

    from dist_ckpt.storage.local import LocalStorage, LocalWriteStream

    class Failing(LocalWriteStream):
        def _write(self, data, offset):
            raise OSError(28, "No space left on device (injected)")

    class Noting(LocalStorage):
        opened: dict[str, str] = {}

        def open_stream(self, target, name):
            self.opened[name] = threading.current_thread().name
            path = f"{target.location}/{name}"
            return Failing(path) if name == fail_name else LocalWriteStream(path)

    return Noting()


def _two_file_items():
    from dist_ckpt.buffers import tensor_memoryview
    from dist_ckpt.writer import WriteItem

    tensors = [torch.full((17 << 18,), float(i)) for i in range(2)]  # 2 x 17 MiB: two files (MIN_PER_THREAD is 32 MiB)
    return tensors, [WriteItem(i, tensor_memoryview(t)) for i, t in enumerate(tensors)]


def test_writer_calling_thread_writes_the_first_file(tmp_path):
    """With two files, the calling thread writes one itself and starts one thread, not two."""
    import threading

    from dist_ckpt.storage import SaveTarget
    from dist_ckpt.writer import write_items

    (tmp_path / "data").mkdir()
    storage = _noting_storage()
    tensors, items = _two_file_items()
    records = write_items(storage, SaveTarget(str(tmp_path), str(tmp_path)), 5, items, threads=2)
    assert sorted(storage.opened) == ["data/r00005-t0.bin", "data/r00005-t1.bin"], storage.opened
    assert storage.opened["data/r00005-t0.bin"] == threading.current_thread().name
    assert storage.opened["data/r00005-t1.bin"].startswith("dist_ckpt-w5")
    for r, t in zip(records, tensors):
        with open(tmp_path / r.file, "rb") as f:
            f.seek(r.offset)
            assert f.read(r.nbytes) == t.numpy().tobytes()


def test_writer_failure_on_the_calling_thread_waits_for_the_other_file(tmp_path):
    """The calling thread's file fails: the error names it, and no writer thread is left running."""
    import threading

    from dist_ckpt.errors import StorageError
    from dist_ckpt.storage import SaveTarget
    from dist_ckpt.writer import write_items

    (tmp_path / "data").mkdir()
    storage = _noting_storage(fail_name="data/r00005-t0.bin")
    _, items = _two_file_items()
    with pytest.raises(StorageError, match=r"r00005-t0\.bin.*No space left"):
        write_items(storage, SaveTarget(str(tmp_path), str(tmp_path)), 5, items, threads=2)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dist_ckpt-w5")]
    assert os.path.getsize(tmp_path / "data" / "r00005-t1.bin") == 17 << 20  # the other file was written to its end
