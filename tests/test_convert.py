"""Converters: DCP (4 ranks) → dist_ckpt (2 ranks), dist_ckpt → DCP / torch.save / safetensors, trust."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_helpers import checkpointer_load, dtensor, global_tensor
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.cli import main
from dist_ckpt.convert import ConvertError, convert
from dist_ckpt.loader import read_manifest
from dist_ckpt.verify import verify

# the modules, even though dist_ckpt re-exports a function named convert
convert_sources = importlib.import_module("dist_ckpt.convert.sources")
convert_sinks = importlib.import_module("dist_ckpt.convert.sinks")

LAYOUTS = {"w": ((16, 12), "shard0"), "v": ((8, 12), "shard1"), "r": ((6, 4), "replicate"), "g": ((8, 12), "shard0_shard1_2d")}


def _dcp_save(rank, world, path):
    sd = {
        "model": {name: dtensor(global_tensor(name, shape), world, layout) for name, (shape, layout) in LAYOUTS.items()},
        "plain": global_tensor("plain", (5,)),
        "extra": {"lr": 0.1, "betas": [0.9, 0.99], "name": "run"},
        "step": 7,
    }
    dcp.save(sd, checkpoint_id=path)


def _dc_load_on(rank, world, path):
    # The target layouts differ from the saved ones: resharding on load.
    target = {
        "model": {name: dtensor(torch.zeros(shape), world, "shard0" if layout != "shard0" else "shard1") for name, (shape, layout) in LAYOUTS.items()},
        "plain": torch.zeros(5),
        "extra": {"lr": 0.0, "betas": [0.0, 0.0], "name": ""},
        "step": 0,
    }
    dc.load(target, path)
    ok = {name: torch.equal(t.full_tensor(), global_tensor(name, LAYOUTS[name][0])) for name, t in target["model"].items()}
    return ok, torch.equal(target["plain"], global_tensor("plain", (5,))), target["extra"], target["step"]


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    run_ranks(_dcp_save, 4, path)
    return path


def test_dcp_from_4_ranks_to_dist_ckpt_loads_on_2_ranks(dcp_dir, tmp_path, capsys):
    dst = str(tmp_path / "converted")
    assert main(["convert", dcp_dir, dst, "--to", "dist_ckpt", "--trust-pickle", "--no-progress"]) == 0
    assert "from dcp" in capsys.readouterr().out
    assert verify(dst).ok
    for ok, plain, extra, step in run_ranks(_dc_load_on, 2, dst).values():
        assert all(ok.values()), ok
        assert plain and extra == {"lr": 0.1, "betas": [0.9, 0.99], "name": "run"} and step == 7


def test_dcp_input_needs_trust_pickle(dcp_dir, tmp_path, capsys):
    dst = str(tmp_path / "converted")
    assert main(["convert", dcp_dir, dst, "--to", "dist_ckpt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dist-ckpt: error:") and "--trust-pickle" in err and "execute" in err and "Traceback" not in err
    assert not os.path.exists(dst)


# -- from dist_ckpt -----------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {
            "w": torch.randn(40, 9, generator=g),
            "b": torch.randn(9, generator=g).to(torch.bfloat16),
            "layers": [torch.arange(6), torch.ones(2, 2, dtype=torch.bool)],
        },
        "opt": {"state": {0: {"m": torch.randn(9, generator=g)}}, "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": [0]}]},
        "scalar": torch.tensor(2.5),
        "step": 11,
        "tag": "run-a",
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    dc.save(_state(), path)
    return path


def test_dist_ckpt_to_dcp_loads_with_dcp(ckpt, tmp_path):
    dst = str(tmp_path / "dcp")
    assert main(["convert", ckpt, dst, "--to", "dcp", "--no-progress"]) == 0
    target = _state()
    for t in [target["model"]["w"], target["model"]["b"], target["opt"]["state"][0]["m"], target["scalar"]]:
        t.zero_()
    target["step"], target["tag"], target["opt"]["param_groups"][0]["betas"] = 0, "", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=dst)
    assert _equal(target, _state())


def test_dist_ckpt_to_torch_save_loads_weights_only(ckpt, tmp_path):
    dst = str(tmp_path / "model.pt")
    assert main(["convert", ckpt, dst, "--to", "torch", "--no-progress"]) == 0
    assert _equal(torch.load(dst, weights_only=True), _state())


def test_dist_ckpt_to_safetensors(ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    dst = str(tmp_path / "model.safetensors")
    assert main(["convert", ckpt, dst, "--to", "safetensors", "--no-progress"]) == 0
    sd = _state()
    loaded = load_file(dst)
    want = {
        "model.w": sd["model"]["w"],
        "model.b": sd["model"]["b"],
        "model.layers.0": sd["model"]["layers"][0],
        "model.layers.1": sd["model"]["layers"][1],
        "opt.state.0.m": sd["opt"]["state"][0]["m"],
        "scalar": sd["scalar"],
    }
    assert _equal(loaded, want)
    with safe_open(dst, "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "11" and meta["tag"] == '"run-a"' and meta["opt.param_groups.0.betas.1"] == "0.99"


def test_safetensors_refuses_ambiguous_names(tmp_path, capsys):
    path = str(tmp_path / "ck")
    dc.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, path)
    assert main(["convert", path, str(tmp_path / "x.safetensors"), "--to", "safetensors"]) == 1
    err = capsys.readouterr().err
    assert "ambiguous" in err and "'a.b'" in err and "['a.b']" in err and "a.b" in err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_dcp_refusal_and_source_corruption_are_clean_errors(tmp_path, capsys):
    path = str(tmp_path / "ck")
    dc.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, path)
    assert main(["convert", path, str(tmp_path / "dcp"), "--to", "dcp"]) == 1
    assert "duplicated flatten key a.b" in capsys.readouterr().err
    path = str(tmp_path / "ck2")
    dc.save({"w": torch.ones(64)}, path)
    m, _, _ = read_manifest(path)
    with open(os.path.join(path, m.files[0]), "r+b") as f:
        f.write(b"\xff\xff")  # corrupt the only chunk
    assert main(["convert", path, str(tmp_path / "dcp"), "--to", "dcp"]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["ck", "ck2"]  # no partial output left behind


def test_torch_save_file_to_dist_ckpt(tmp_path):
    src, dst = str(tmp_path / "in.pt"), str(tmp_path / "ck")
    torch.save(_state(), src)
    # Plain tensors and containers: torch.load(weights_only=True) reads them, no trust needed (issue 22 item 8;
    # this line asserted "== 1" before, when every torch.save file needed --trust-pickle).
    assert main(["convert", src, dst, "--to", "dist_ckpt", "--no-progress"]) == 0
    target = _state()
    target["model"]["w"].zero_()
    target["step"] = 0
    dc.load(target, dst)
    assert _equal(target, _state())


def test_converter_reads_one_tensor_at_a_time(ckpt, tmp_path, monkeypatch):
    calls = []
    real = convert_sources.read_tensors

    def spy(storage, root, files, tasks, *a, **k):
        calls.append(len(tasks))
        return real(storage, root, files, tasks, *a, **k)

    monkeypatch.setattr(convert_sources, "read_tensors", spy)
    monkeypatch.setattr(convert_sinks, "BATCH_BYTES", 1024)  # several data files
    monkeypatch.setattr(convert_sinks, "CHUNK_BYTES", 512)  # model.w split into dim-0 chunks
    result = convert(ckpt, str(tmp_path / "copy"), "dist_ckpt")
    assert calls == [1] * result.tensors == [1] * 6
    m, _, _ = read_manifest(str(tmp_path / "copy"))
    assert len(m.files) > 1 and len(m.tensors[("model", "w")].chunks) == 3  # 14 rows of 36 bytes each
    assert verify(str(tmp_path / "copy")).ok
    assert _equal(checkpointer_load(str(tmp_path / "copy")), _state())


class Opaque:
    def __init__(self, v):
        self.v = v


def test_pickled_values_are_never_unpickled_without_trust(tmp_path, capsys):
    src = str(tmp_path / "ck")
    ck = dc.make_sync_checkpointer(dc.Config(allow_pickle=True))
    ck.save(src, {"w": torch.ones(2), "cfg": Opaque(3)})
    ck.close()
    assert main(["convert", src, str(tmp_path / "x.pt"), "--to", "torch"]) == 1
    assert "cfg" in capsys.readouterr().err
    # with trust the object is unpickled, but weights_only could not load it back: refused
    with pytest.raises(ConvertError, match="cfg.*weights_only"):
        convert(src, str(tmp_path / "y.pt"), "torch", trust_pickle=True)
    # safetensors leaves it out (reported), dist_ckpt copies its bytes
    assert convert(src, str(tmp_path / "z.safetensors"), "safetensors").skipped == ["cfg"]
    convert(src, str(tmp_path / "copy"), "dist_ckpt")
    out = dc.load({"w": torch.zeros(2), "cfg": None}, str(tmp_path / "copy"), allow_pickle=True)
    assert out["cfg"].v == 3


def test_existing_destination_is_refused(ckpt, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["convert", ckpt, str(tmp_path / "taken"), "--to", "dcp"]) == 1
    assert "already exists" in capsys.readouterr().err


# -- torch.save with weights_only first, safetensors input, --select, DCP buckets ----------------


class Trap:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_torch_save_needs_trust_only_when_weights_only_refuses_it(tmp_path, capsys):
    src, marker = str(tmp_path / "in.pt"), str(tmp_path / "unpickled")
    torch.save({"w": torch.ones(3), "trap": Trap(marker)}, src)
    assert main(["convert", src, str(tmp_path / "ck"), "--to", "dist_ckpt", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dist-ckpt: error:") and "torch.load(weights_only=True) refused" in err and "--trust-pickle" in err and "in.pt" in err
    assert "Traceback" not in err and not os.path.exists(marker) and not os.path.exists(tmp_path / "ck")
    assert main(["convert", src, str(tmp_path / "ck"), "--to", "dist_ckpt", "--trust-pickle", "--pickle-objects", "--no-progress"]) == 0
    assert os.path.exists(marker)  # with trust it was unpickled, as asked


def test_safetensors_source_and_select_with_strip_prefix(ckpt, tmp_path, capsys):
    weights = str(tmp_path / "model.safetensors")
    assert main(["convert", ckpt, weights, "--to", "safetensors", "--select", "model", "--strip-prefix", "--no-progress"]) == 0
    from safetensors.torch import load_file

    sd = _state()["model"]
    assert _equal(load_file(weights), {"w": sd["w"], "b": sd["b"], "layers.0": sd["layers"][0], "layers.1": sd["layers"][1]})
    back = str(tmp_path / "back")
    assert main(["convert", weights, back, "--to", "dist_ckpt", "--no-progress"]) == 0  # safetensors as a source
    assert "from safetensors" in capsys.readouterr().out
    target = {
        "w": torch.zeros(40, 9),
        "b": torch.zeros(9, dtype=torch.bfloat16),
        "layers.0": torch.zeros(6, dtype=torch.int64),
        "layers.1": torch.zeros(2, 2, dtype=torch.bool),
    }
    dc.load(target, back)
    assert _equal(target, load_file(weights)) and verify(back).ok
    sel = str(tmp_path / "sel")
    assert main(["convert", ckpt, sel, "--to", "dist_ckpt", "--select", "model.layers", "--no-progress"]) == 0
    assert _equal(checkpointer_load(sel), {"model": {"layers": sd["layers"]}})
    assert main(["convert", ckpt, str(tmp_path / "none"), "--to", "dist_ckpt", "--select", "modle"]) == 1
    err = capsys.readouterr().err
    assert "--select 'modle' matches no value" in err and "model" in err and not os.path.exists(tmp_path / "none")


def test_dcp_output_is_one_file_per_size_bucket(ckpt, tmp_path, monkeypatch):
    one = str(tmp_path / "one")
    convert(ckpt, one, "dcp")
    assert [n for n in os.listdir(one) if n.endswith(".distcp")] == ["__0_0.distcp"]  # not one per tensor
    monkeypatch.setattr(convert_sinks, "BUCKET_BYTES", 400)  # model.w (1440 bytes) alone, the small ones together
    many = str(tmp_path / "many")
    convert(ckpt, many, "dcp")
    files = [n for n in os.listdir(many) if n.endswith(".distcp")]
    assert 1 < len(files) < 6
    target = _state()
    for t in [target["model"]["w"], target["model"]["b"], target["opt"]["state"][0]["m"], target["scalar"]]:
        t.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=many)
    assert _equal(target, _state())
