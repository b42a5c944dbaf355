"""The ``dist-ckpt`` command: help, ls, inspect, verify, gc, exit codes and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from dist_helpers import as_v1

import dist_ckpt as dc
from dist_ckpt.cli import main
from dist_ckpt.commit import MANIFEST
from dist_ckpt.loader import read_manifest

COMMANDS = ["ls", "inspect", "verify", "convert", "gc"]


class Trap:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _save(path: str, step: int = 1) -> None:
    dc.save({"model": {"w": torch.randn(8, 3), "layers": [torch.arange(4)]}, "step": step, "empty": {}}, path)


@pytest.fixture
def root(tmp_path):
    """step 1 and 2 committed, an unfinished save, a step dir never committed, an unrelated dir."""
    r = tmp_path / "ckpts"
    r.mkdir()
    _save(str(r / "step-00000001"), 1)
    _save(str(r / "step-00000002"), 2)
    (r / "step-00000003.tmp-abc123" / "data").mkdir(parents=True)
    (r / "step-00000004" / "data").mkdir(parents=True)
    (r / "notes").mkdir()
    return r


def test_help_of_every_command_has_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    for c in COMMANDS:
        assert main([c, "--help"]) == 0
        assert "examples:" in capsys.readouterr().out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "dist-ckpt")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "verify" in res.stdout and "convert" in res.stdout


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert main([]) == 2
    assert main(["verify"]) == 2
    assert main(["gc", str(tmp_path), "--keep-last", "0"]) == 2
    assert main(["convert", "a", "b", "--to", "zip"]) == 2
    assert main(["inspect", "gs://bucket/ck"]) == 2  # s3:// is built in since issue 17
    assert "no storage backend" in capsys.readouterr().err


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    for argv in (["inspect", str(tmp_path / "nope")], ["verify", str(tmp_path / "nope")], ["ls", str(tmp_path / "nope")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("dist-ckpt: error:") and "nope" in err and "Traceback" not in err
    (tmp_path / "half").mkdir()
    assert main(["inspect", str(tmp_path / "half")]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_ls_shows_states_and_marks_newest(root, capsys):
    assert main(["ls", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[2:].split()[0]: line for line in lines[1:] if line[2:].startswith("step-")}
    assert set(rows) == {"step-00000001", "step-00000002", "step-00000003.tmp-abc123", "step-00000004"}
    assert rows["step-00000002"].startswith("* ") and "committed" in rows["step-00000002"]
    assert rows["step-00000001"].startswith("  ") and rows["step-00000001"].split()[1] == "committed"
    assert rows["step-00000003.tmp-abc123"].split()[1] == "incomplete" and rows["step-00000004"].split()[1] == "incomplete"
    assert rows["step-00000002"].split()[-2] == "1"  # world size
    assert "notes" not in "\n".join(lines) and lines[-1] == "newest committed: step-00000002"


def test_inspect_tree_and_pickled_values_stay_pickled(tmp_path, capsys):
    path, marker = str(tmp_path / "ck"), str(tmp_path / "unpickled")
    ck = dc.make_sync_checkpointer(dc.Config(allow_pickle=True))
    ck.save(
        path,
        {
            "model": {"w": torch.zeros(8, 3), "layers": [torch.arange(4)]},
            "trap": Trap(marker),
            "step": 5,
            "blob": b"xyz",
            "empty": {},
            "rng": dc.rank_local(torch.zeros(3)),
            "pos": dc.rank_local(17),
        },
    )
    ck.close()
    size = len(read_manifest(path)[0].objects[("trap",)].data)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    lines = [line.rstrip() for line in out.splitlines()]
    assert any(line.startswith("model") for line in lines)
    assert any(line.strip().startswith("w") and "float32 [8, 3]" in line and "1 chunk" in line and "96 B" in line for line in lines)
    assert any(line.strip().startswith("[0]") and "int64 [4]" in line for line in lines)
    assert f"<pickled {size} bytes>" in out and "= 5" in out and "<3 bytes>" in out and "{}" in out
    assert "rank-local on 1 rank(s); rank 0: float32 [3]" in out and "rank-local on 1 rank(s); rank 0: = 17" in out
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not os.path.exists(marker)
    tensors = {tuple(t["key"]): t for t in info["tensors"]}
    assert tensors[("model", "w")] == {"key": ["model", "w"], "name": "model.w", "rank": None, "dtype": "float32", "shape": [8, 3], "chunks": 1, "nbytes": 96}
    objects = {tuple(o["key"]): o for o in info["objects"]}
    assert objects[("trap",)]["type"] == "pickled" and objects[("trap",)]["value"] == {"pickled_bytes": size}
    assert objects[("step",)]["value"] == 5 and info["world_size"] == 1 and info["nbytes"] == 96 + 32 + 12
    assert tensors[("rng",)]["rank"] == 0 and objects[("pos",)] == {"key": ["pos"], "name": "pos", "rank": 0, "type": "int", "value": 17}


def test_verify_clean_and_corrupt(tmp_path, capsys):
    path = str(tmp_path / "ck")
    _save(path)
    assert main(["verify", path, "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith("OK")
    m, _, _ = read_manifest(path)
    e = m.tensors[("model", "w")]
    name, offset = m.files[int(e.chunks.file[0])], int(e.chunks.offset[0])
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(offset + 5)
        b = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([b[0] ^ 0x80]))
    assert main(["verify", path, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and f"model.w  file {name}  offset {offset}" in out and "checksum mismatch" in out


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_verify_missing_or_truncated_data_file(tmp_path, capsys, damage):
    path = str(tmp_path / "ck")
    _save(path)
    data = os.path.join(path, read_manifest(path)[0].files[0])
    if damage == "missing":
        os.remove(data)
    else:
        os.truncate(data, 50)  # inside the first chunk: every chunk is cut
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert f"file {damage}" in out and "model.w  file data/" in out


def test_gc_dry_run_then_remove(root, capsys):
    (root / "step-00000002.old-xyz").mkdir()  # its final dir is committed: a leftover
    (root / "step-00000009.old-xyz").mkdir()  # no final dir: the only copy, kept
    before = sorted(os.listdir(root))
    assert main(["gc", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(root)) == before
    assert "would remove step-00000003.tmp-abc123" in out and "would remove step-00000004" in out and "would remove step-00000002.old-xyz" in out
    assert main(["gc", str(root)]) == 0
    assert sorted(os.listdir(root)) == ["notes", "step-00000001", "step-00000002", "step-00000009.old-xyz"]
    assert main(["gc", str(root), "--keep-last", "1"]) == 0
    assert "removed step-00000001" in capsys.readouterr().out
    assert sorted(os.listdir(root)) == ["notes", "step-00000002", "step-00000009.old-xyz"]
    assert os.path.isfile(root / "step-00000002" / MANIFEST)


def test_gc_never_removes_newest_committed(tmp_path, capsys):
    r = tmp_path / "ckpts"
    r.mkdir()
    _save(str(r / "step-00000005"), 5)
    (r / "step-00000007").mkdir()  # a newer step, but never committed
    assert main(["gc", str(r), "--keep-last", "1"]) == 0
    assert sorted(os.listdir(r)) == ["step-00000005"]
    assert main(["gc", str(r), "--keep-last", "1"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_gc_min_age_spares_fresh_tmp_dirs(root, capsys):
    assert main(["gc", str(root), "--min-age", "3600"]) == 0
    assert "step-00000003.tmp-abc123" in os.listdir(root)


def test_gc_and_ls_leave_a_dcp_checkpoint_alone(root, capsys):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(root / "step-00000007"), no_dist=True)
    (root / "step-00000005" / "data").mkdir(parents=True)
    (root / "step-00000005" / "data" / "notes.txt").write_text("not ours")
    dcp_files = sorted(os.listdir(root / "step-00000007"))
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step-00000007: holds a DCP checkpoint (.metadata); not a dist_ckpt checkpoint" in out
    assert main(["gc", str(root), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "left alone step-00000007  (holds a DCP checkpoint (.metadata)" in out and "left alone step-00000005" in out
    assert sorted(os.listdir(root)) == ["notes", "step-00000002", "step-00000005", "step-00000007"]
    assert sorted(os.listdir(root / "step-00000007")) == dcp_files


# -- crafted checkpoints: one typed line, never a traceback (issue 22 item 7) ----------------


def _rewrite_manifest(path: str, change) -> None:
    import msgpack

    from dist_ckpt.manifest import _pairs

    with open(os.path.join(path, MANIFEST), "rb") as f:
        obj = msgpack.unpackb(f.read(), strict_map_key=False, raw=False, object_pairs_hook=_pairs)
    change(obj)
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(msgpack.packb(obj, use_bin_type=True))


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


CRAFTED = {
    "NUL in a file name": (lambda m: m["files"].__setitem__(0, "data/r\x0000000.bin"), "files[0]"),
    "data as a file name": (lambda m: m["files"].__setitem__(0, "data"), "files[0]: data file name 'data'"),
    "dot as a file name": (lambda m: m["files"].__setitem__(0, "."), "files[0]: data file name '.'"),
    "infinite created": (lambda m: m.__setitem__("created", float("inf")), "created must be a Unix time"),
    "NaN created": (lambda m: m.__setitem__("created", float("nan")), "created must be a Unix time"),
    "huge created": (lambda m: m.__setitem__("created", 1e300), "created must be a Unix time"),
    "user_meta 500 deep": (lambda m: m.__setitem__("user_meta", {"x": _nested(500)}), "user_meta nests deeper than 200"),
    "value 500 deep": (lambda m: m["objects"].__setitem__(("step",), _nested(500)), "objects[['step']] nests deeper than 200"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_manifest_fields_are_one_typed_line_and_ls_lists_the_rest(root, capsys, case):
    change, field = CRAFTED[case]
    bad = str(root / "step-00000002")
    _rewrite_manifest(bad, change)
    for argv in (["inspect", bad], ["inspect", bad, "--json"], ["verify", bad]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dist-ckpt: error: {bad}/{MANIFEST}: ") and field in err and err.count("\n") == 1
    with pytest.raises(dc.ManifestError, match="MANIFEST: .*" + field.replace("[", r"\[").replace("]", r"\]")[:12]):
        dc.load({"model": {"w": torch.zeros(8, 3), "layers": [torch.zeros(4, dtype=torch.int64)]}, "step": 0, "empty": {}}, bad)
    assert main(["ls", str(root)]) == 0  # one bad step does not break the listing of the others
    out = capsys.readouterr().out
    rows = {line[2:].split()[0]: line for line in out.splitlines() if line[2:].startswith("step-")}
    assert rows["step-00000002"].split()[1] == "invalid" and rows["step-00000001"].startswith("* ")


def test_manifest_that_is_a_directory_is_a_typed_error(tmp_path, capsys):
    path = tmp_path / "ck"
    (path / MANIFEST).mkdir(parents=True)
    assert main(["inspect", str(path)]) == 1
    assert f"{path}/{MANIFEST} is a directory" in capsys.readouterr().err
    with pytest.raises(dc.ManifestError, match="is a directory"):
        dc.load({"w": torch.zeros(1)}, str(path))


def test_shape_of_2_40_elements_is_refused_before_allocating(tmp_path, capsys):
    import numpy as np

    path = str(tmp_path / "ck")
    dc.save({"w": torch.ones(4), "step": 1}, path)

    def huge(m):  # one chunk of 2**40 float32 elements over a 16-byte data file
        col = lambda v, dt: np.array([v], dt).tobytes()  # noqa: E731
        m["tensors"][("w",)].update(
            shape=[1 << 40],
            chunks={
                "n": 1,
                "offsets": col(0, "<i8"),
                "sizes": col(1 << 40, "<i8"),
                "file": col(0, "<i4"),
                "offset": col(0, "<i8"),
                "nbytes": col(4 << 40, "<i8"),
                "xxh3": col(0, "<u8"),
            },
        )

    as_v1(path)  # the chunk table to craft is version 1's
    _rewrite_manifest(path, huge)
    with pytest.raises(dc.DataFileError, match="r00000.bin has 16 bytes but its chunks .*of w.* need 4398046511104"):
        with dc.make_sync_checkpointer() as ck:
            ck.load(path)  # no target: would allocate 4 TiB
    assert main(["convert", path, str(tmp_path / "out"), "--to", "dist_ckpt", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dist-ckpt: error: data file") and "refusing to allocate" in err and err.count("\n") == 1


# -- progress bars, pipes, and what a wrong path is ----------------------------------------------


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dist_ckpt.cli", *argv]


def _under_pty(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a fresh pseudo-terminal (which reports no size, as `script` may)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        out += data
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_progress_bars_show_on_a_terminal_and_not_when_piped(tmp_path):
    path = str(tmp_path / "ck")
    dc.save({"w": torch.randn(1 << 18), "v": torch.randn(1 << 16)}, path)
    rc, out = _under_pty(_cli("verify", path))
    assert rc == 0 and "verify: 100%" in out and "1.25M/1.25M" in out and "OK  " in out
    rc, out = _under_pty(_cli("convert", path, str(tmp_path / "x.safetensors"), "--to", "safetensors"))
    assert rc == 0 and "convert: 100%" in out and "wrote " in out
    res = subprocess.run(_cli("verify", path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "" and res.stdout.startswith("OK")


def test_inspect_into_a_closed_pipe_exits_0_quietly(tmp_path):
    path = str(tmp_path / "ck")
    dc.save({f"key_{i:05d}": i for i in range(4000)}, path)  # ~100 KB of tree: more than a pipe holds
    proc = subprocess.Popen(_cli("inspect", path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"checkpoint")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_inspect_and_verify_say_what_a_wrong_path_is(root, tmp_path, capsys):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for cmd in ("inspect", "verify"):
        assert main([cmd, str(tmp_path / "dcp")]) == 1
        err = capsys.readouterr().err
        assert "is a DCP checkpoint" in err and f"dist-ckpt convert {tmp_path / 'dcp'} " in err and "--to dist_ckpt" in err and err.count("\n") == 1
        assert main([cmd, str(root)]) == 1
        err = capsys.readouterr().err
        assert "is a checkpoint root" in err and f"dist-ckpt ls {root}" in err and f"dist-ckpt {cmd} {root}/step-00000002" in err
        assert main([cmd, str(root / "step-00000001" / "data")]) == 1
        err = capsys.readouterr().err
        assert "data folder of the checkpoint" in err and f"dist-ckpt {cmd} {root / 'step-00000001'}" in err
