"""What a new user hits first: settings, keywords, user_meta, launch mistakes, URL schemes, logs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.cli import main as cli_main
from dist_ckpt.config import Config
from dist_ckpt.errors import StateDictError, UnsupportedScheme
from dist_ckpt.loader import read_manifest
from dist_ckpt.manager import CheckpointManager
from dist_ckpt.user_meta import MAX_USER_META_BYTES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "30"}
META = {"git": "3f2a9c1", "lr": 3e-4, "tags": ["a", None, True, b"\x00"], "nested": {"k": [1, -2, 2**63]}}


def python(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this interpreter with the worktree first on the path (a plain process: no launcher, no process group)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True, timeout=timeout)


# -- item 3: a save before init_process_group under a launcher ------------------------

_NO_GROUP = """
import sys, torch, dist_ckpt as dc
what, path = sys.argv[1], sys.argv[2]
try:
    if what == "save":
        dc.save({"x": torch.ones(4)}, path)
    elif what == "async_save":
        dc.async_save({"x": torch.ones(4)}, path)[1].result()
    else:
        dc.make_sync_checkpointer().close()
    print("RESULT saved")
except Exception as e:
    print(f"RESULT {type(e).__name__}: {e}")
"""


@pytest.mark.parametrize("what", ["save", "async_save", "checkpointer"])
def test_save_before_init_process_group_refuses_on_every_rank(tmp_path, what):
    path = str(tmp_path / "ck")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NO_GROUP, what, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, out in enumerate(outs):
        line = [x for x in out.splitlines() if x.startswith("RESULT")]
        assert line and line[0].startswith("RESULT ProcessGroupNotInitialized"), (rank, out)
        assert "init_process_group" in line[0] and f"rank {rank}" in line[0]
    assert not os.path.exists(path)


# -- item 6: every documented setting reaches the user ---------------------------------


def test_save_and_load_take_allow_pickle(tmp_path):
    path = str(tmp_path / "ck")
    dc.save({"s": {1, 2}}, path, allow_pickle=True)  # what the refusal message says to pass
    out = {"s": None}
    with pytest.raises(dc.PickleNotAllowed):
        dc.load(out, path)
    dc.load(out, path, allow_pickle=True)
    assert out["s"] == {1, 2}
    with dc.make_sync_checkpointer() as ck:
        ck.save(str(tmp_path / "ck2"), {"s": {3}}, allow_pickle=True)
        assert ck.load(str(tmp_path / "ck2"), {"s": None}, allow_pickle=True)["s"] == {3}


@pytest.mark.parametrize("raw, value", [("1", True), ("yes", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("False", False)])
def test_from_env_reads_boolean_settings(monkeypatch, raw, value):
    monkeypatch.setenv("DIST_CKPT_ALLOW_PICKLE", raw)
    monkeypatch.setenv("DIST_CKPT_VERIFY_CHECKSUMS", raw)
    cfg = Config.from_env()
    assert cfg.allow_pickle is value and cfg.verify_checksums is value


def test_every_config_field_has_its_environment_variable(monkeypatch):
    values = {
        "timeout_s": ("42.5", 42.5),
        "heartbeat_interval_s": ("0.5", 0.5),
        "heartbeat_timeout_s": ("7", 7.0),
        "writer_threads": ("3", 3),
        "reader_threads": ("5", 5),
        "verify_checksums": ("no", False),
        "allow_pickle": ("yes", True),
        "coordinator": ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        "max_message_bytes": ("4096", 4096),
        "s3_part_size": (str(8 << 20), 8 << 20),
        "s3_max_in_flight": ("6", 6),
        "peer_encryption": ("1", True),
        "format_version": ("2", 2),
    }
    import dataclasses

    assert set(values) == {f.name for f in dataclasses.fields(Config)}
    for name, (raw, _) in values.items():
        monkeypatch.setenv(f"DIST_CKPT_{name.upper()}", raw)
    cfg = Config.from_env()
    assert {name: getattr(cfg, name) for name in values} == {name: v for name, (_, v) in values.items()}
    assert Config.from_env(writer_threads=9).writer_threads == 9  # an override beats the environment


@pytest.mark.parametrize(
    "var, raw", [("DIST_CKPT_ALLOW_PICKLE", "maybe"), ("DIST_CKPT_VERIFY_CHECKSUMS", "2"), ("DIST_CKPT_WRITER_THREADS", "two"), ("DIST_CKPT_TIMEOUT_S", "10m")]
)
def test_bad_environment_values_raise_naming_the_variable(monkeypatch, var, raw):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=var):
        Config.from_env()


def test_load_honours_the_environment(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    dc.save({"s": {1}}, path, allow_pickle=True)
    monkeypatch.setenv("DIST_CKPT_ALLOW_PICKLE", "1")
    assert dc.load({"s": None}, path)["s"] == {1}


def test_misspelled_keywords_raise_type_error_at_once(tmp_path):
    sd = {"x": torch.ones(3)}
    path = str(tmp_path / "ck")
    with pytest.raises(TypeError):
        dc.save(sd, path, overwirte=True)
    with dc.make_sync_checkpointer() as ck:
        with pytest.raises(TypeError):
            ck.save(path, sd, overwirte=True)
        ck.save(path, sd)
        with pytest.raises(TypeError):
            ck.load(path, sd, strcit=True)
    with dc.make_async_checkpointer() as ack:
        with pytest.raises(TypeError):
            ack.save(str(tmp_path / "ck2"), sd, overwirte=True)
    with CheckpointManager(str(tmp_path / "root"), async_save=False) as mgr:
        with pytest.raises(TypeError):
            mgr.save(1, sd, overwirte=True)
    assert sorted(os.listdir(tmp_path)) == ["ck", "root"]


# -- item 9: process mode from a script without a __main__ guard ----------------------

_SCRIPT = """
import torch, dist_ckpt as dc
def run():
    try:
        ck = dc.make_async_checkpointer(mode="process")
        ck.save({path!r}, {{"x": torch.arange(4.0)}})[1].result()
        ck.close()
        print("RESULT ok", flush=True)
    except Exception as e:
        print(f"RESULT {{type(e).__name__}}: {{e}}", flush=True)
"""


def test_process_mode_without_main_guard_fails_at_once_naming_the_fix(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(path=str(tmp_path / "ck"))) + "run()\n")
    out = python([str(script)], {}).stdout
    result = [x for x in out.splitlines() if x.startswith("RESULT")]
    assert len(result) == 1, out  # the script ran once: no writer re-ran it
    assert result[0].startswith("RESULT CheckpointProcessError") and 'if __name__ == "__main__":' in result[0] and str(script) in result[0]
    assert not (tmp_path / "ck").exists()


def test_process_mode_with_main_guard_saves(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(path=str(tmp_path / "ck"))) + 'if __name__ == "__main__":\n    run()\n')
    out = python([str(script)], {}).stdout
    assert [x for x in out.splitlines() if x.startswith("RESULT")] == ["RESULT ok"], out
    assert torch.equal(dc.load({"x": torch.zeros(4)}, str(tmp_path / "ck"))["x"], torch.arange(4.0))


# -- item 11: user_meta ------------------------------------------------------------------


def test_user_meta_through_every_save_api_and_back(tmp_path, capsys):
    sd = {"x": torch.ones(8)}
    dc.save(sd, str(tmp_path / "a"), user_meta=META)
    dc.async_save(sd, str(tmp_path / "b"), user_meta=META)[1].result(timeout=60)
    with dc.make_sync_checkpointer() as ck:
        ck.save(str(tmp_path / "c"), sd, user_meta=META)
    with dc.make_async_checkpointer() as ack:
        ack.save(str(tmp_path / "d"), sd, user_meta=META)[1].result(timeout=60)
    for name in "abcd":
        assert read_manifest(str(tmp_path / name))[0].user_meta == META, name
    for async_save in (False, True):
        with CheckpointManager(str(tmp_path / f"root{async_save}"), async_save=async_save) as mgr:
            mgr.save(7, sd, user_meta=META)
            mgr.wait()
            assert mgr.manifest(7).user_meta == META and mgr.manifest().user_meta == META
    assert cli_main(["inspect", str(tmp_path / "a")]) == 0
    assert "user_meta" in capsys.readouterr().out and "3f2a9c1" in str(META)


@pytest.mark.parametrize(
    "meta, where",
    [
        ({"t": (1, 2)}, "user_meta['t']: tuple"),
        ({"s": {1}}, "user_meta['s']: set"),
        ({"t": torch.ones(1)}, "user_meta['t']: Tensor"),
        ({"d": {3: "x"}}, "keys must be str"),
        ({"big": 2**64}, "64 bits"),
        ({"huge": "x" * (MAX_USER_META_BYTES + 1)}, "bytes packed"),
        (["not", "a", "map"], "must be a dict"),
    ],
)
def test_user_meta_refuses_what_msgpack_cannot_store(tmp_path, meta, where):
    path = str(tmp_path / "ck")
    with pytest.raises(StateDictError, match=where.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        dc.save({"x": torch.ones(2)}, path, user_meta=meta)
    with pytest.raises(StateDictError):
        dc.async_save({"x": torch.ones(2)}, path, user_meta=meta)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


# -- item 13: URL schemes, the abort path, one INFO line per save ------------------------


@pytest.mark.parametrize("url", ["gs://bucket/x", "foo://x"])  # s3:// is built in since issue 17
def test_unsupported_scheme_is_refused_before_anything_starts(tmp_path, url):
    threads = {t.name for t in threading.enumerate()}
    for call in (lambda: dc.save({"x": torch.ones(2)}, url), lambda: dc.async_save({"x": torch.ones(2)}, url), lambda: CheckpointManager(url)):
        with pytest.raises(UnsupportedScheme, match="supported: plain paths, file://"):
            call()
    assert {t.name for t in threading.enumerate()} <= threads  # no coordinator, agent or writer started for it
    with dc.make_sync_checkpointer() as ck:
        with pytest.raises(UnsupportedScheme, match=url.split(":")[0]):
            ck.save(url, {"x": torch.ones(2)})
    with pytest.raises(ValueError):  # still a ValueError for callers that catch that
        dc.save({"x": torch.ones(2)}, url)


def test_a_save_refused_before_its_plan_logs_its_path(tmp_path, caplog):
    path = str(tmp_path / "ck")
    with caplog.at_level(logging.ERROR, logger="dist_ckpt.coordinator"):
        with pytest.raises(dc.PickleNotAllowed):
            dc.save({"s": {1}}, path)
        dc.save({"x": torch.ones(1)}, path + "-next")  # the coordinator handles messages in order: the abort is logged by now
    aborted = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
    assert len(aborted) == 1 and f" to {path} aborted" in aborted[0], aborted


def _logged_saves(rank, world, root):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    from dist_ckpt.api import _default

    logger = logging.getLogger("dist_ckpt")
    mgr = CheckpointManager(f"{root}/mgr", async_save=False)
    _default()  # the functional API's session: its start-up line is not a save's
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Keep())
    w = torch.full((8 * (rank + 1), 4), float(rank))
    mgr.save(42, {"w": dc.rank_local(w), "r": torch.arange(16.0)}, user_meta={"rank": rank})
    dc.save({"w": dc.rank_local(w)}, f"{root}/plain", step=43)
    dc.save({"w": dc.rank_local(w)}, f"{root}/nostep")
    meta = mgr.manifest(42).user_meta
    mgr.close()
    return [(r.levelno, r.name, r.getMessage()) for r in records], meta


def test_rank_0_logs_one_info_line_per_save_and_every_line_names_its_rank(tmp_path):
    out = run_ranks(_logged_saves, 2, str(tmp_path), env=FAST, timeout=120)
    for rank, (records, meta) in out.items():
        assert meta == {"rank": 0}  # rank 0's user_meta wins
        assert records and all(msg.startswith(f"[rank {rank}] ") for _, _, msg in records), [m for _, _, m in records if not m.startswith(f"[rank {rank}]")]
        info = [msg for level, _, msg in records if level >= logging.INFO]
        if rank == 1:
            assert info == []
            continue
        assert len(info) == 3, info
        manager_line, plain, nostep = info
        assert "checkpoint step 42" in manager_line
        assert "step 43 saved to " + str(tmp_path / "plain") in plain and "saved " + str(tmp_path / "nostep") in nostep
        for line in info:
            for part in ("stage ", "plan ", "write ", "commit ", "GB/s", "slowest rank ", "by 2 ranks" if line != manager_line else "checkpoint "):
                assert part in line, (part, line)
