"""What load gives back: aliased containers, rank-local values, dtypes, numpy, strictness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import dist_ckpt as dc

# -- aliased containers ---------------------------------------------------------


def test_shared_list_gets_each_place_its_own_saved_value(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"x": [1.0], "y": [2.0]}, p)
    a = [0.0]
    out = dc.load({"x": a, "y": a}, p)
    assert out == {"x": [1.0], "y": [2.0]}
    assert a == [0.0]  # the shared list is neither half-loaded nor overwritten


def test_shared_nested_dicts_lists_and_tuples(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"a": {"k": [1, (2, 3)]}, "b": {"k": [4, (5, 6)]}, "c": [{"k": [7, (8, 9)]}]}, p)
    inner = {"k": [0, (0, 0)]}
    target = {"a": inner, "b": inner, "c": [inner]}
    out = dc.load(target, p)
    assert out == {"a": {"k": [1, (2, 3)]}, "b": {"k": [4, (5, 6)]}, "c": [{"k": [7, (8, 9)]}]}
    assert inner == {"k": [0, (0, 0)]}


def test_shared_list_inside_a_tuple_at_the_root(tmp_path):
    p = str(tmp_path / "ck")
    dc.save(([1], [2]), p)
    a = [0]
    assert dc.load((a, a), p) == ([1], [2])
    assert a == [0]


def test_unshared_containers_are_still_filled_in_place(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"x": [1.0, 2.0], "y": {"z": 3}}, p)
    x, y = [0.0, 0.0], {"z": 0}
    dc.load({"x": x, "y": y}, p)
    assert x == [1.0, 2.0] and y == {"z": 3}


def _sequential_lr():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=100)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[3])


def test_sequential_lr_state_dict_tiny_repro(tmp_path):
    opt, sched = _sequential_lr()
    for _ in range(5):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    dc.save({"sched": saved}, str(tmp_path / "ck"))
    _, fresh = _sequential_lr()
    sd = {"sched": fresh.state_dict()}  # shares _last_lr with its first child's
    dc.load(sd, str(tmp_path / "ck"))
    fresh.load_state_dict(sd["sched"])
    assert fresh.get_last_lr() == sched.get_last_lr()
    assert sd["sched"]["_schedulers"][0]["_last_lr"] == saved["_schedulers"][0]["_last_lr"]


# -- strictness -----------------------------------------------------------------


def test_every_shape_mismatch_is_listed(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({f"t{i}": torch.ones(2) for i in range(30)}, p)
    with pytest.raises(dc.LoadMismatchError) as ei:
        dc.load({f"t{i}": torch.zeros(3) for i in range(30)}, p, strict=False)
    text = str(ei.value)
    assert all(f"t{i}: checkpoint has float32 [2], target is float32 [3]" in text for i in range(30))


def test_strict_failure_with_many_keys_ends_with_the_hint(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({f"a{i}": i for i in range(300)}, p)
    with pytest.raises(dc.LoadMismatchError) as ei:
        dc.load({f"b{i}": i for i in range(300)}, p)
    text = str(ei.value)
    assert "a299" in text and "b299" in text
    assert text.rstrip().endswith("pass strict=False to load the keys that match and leave the rest of the target as it is")


def test_checkpointer_load_is_strict_by_default_like_dc_load(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"a": torch.ones(2), "b": 1}, p)
    ck = dc.make_sync_checkpointer()
    try:
        with pytest.raises(dc.LoadMismatchError, match="not the target: b"):
            ck.load(p, {"a": torch.zeros(2)})
        assert torch.equal(ck.load(p, {"a": torch.zeros(2)}, strict=False)["a"], torch.ones(2))
    finally:
        ck.close()


# -- dtypes on load ------------------------------------------------------------


def test_float32_checkpoint_into_bfloat16_target_converts_with_one_log_line(tmp_path, caplog):
    p = str(tmp_path / "ck")
    saved = {f"w{i}": torch.randn(4, 3) for i in range(5)}
    dc.save(saved, p)
    target = {k: torch.zeros(4, 3, dtype=torch.bfloat16) for k in saved}
    info = dc.LoadInfo()
    with caplog.at_level(logging.INFO, logger="dist_ckpt.loader"):
        dc.load(target, p, strict=False, info=info)
    for k in saved:
        assert target[k].dtype == torch.bfloat16 and torch.equal(target[k], saved[k].to(torch.bfloat16))
    lines = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(lines) == 1 and "float32 -> bfloat16: 5" in lines[0]
    assert sorted(info.converted) == sorted((k,) for k in saved)


def test_float16_into_float64_and_strict_refusal_names_every_key_with_the_hint(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"a": torch.ones(3, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}, p)
    with pytest.raises(dc.LoadMismatchError) as ei:
        dc.load({"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}, p)
    assert "a: checkpoint has float16 [3], target is float64 [3]" in str(ei.value) and "b: checkpoint has float16" in str(ei.value)
    assert str(ei.value).endswith("pass strict=False to load the keys that match and leave the rest of the target as it is")
    out = dc.load({"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}, p, strict=False)
    assert torch.equal(out["a"], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "saved, target",
    [(torch.float32, torch.int64), (torch.int64, torch.float32), (torch.bool, torch.uint8), (torch.float32, torch.bool), (torch.float32, torch.complex64)],
)
def test_conversions_that_change_meaning_are_refused_naming_the_key(tmp_path, saved, target):
    p = str(tmp_path / "ck")
    dc.save({"m": {"x": torch.ones(3, dtype=saved)}}, p)
    t = torch.zeros(3, dtype=target)
    with pytest.raises(dc.LoadMismatchError, match=r"m\.x: checkpoint has .* converting would change what the values mean"):
        dc.load({"m": {"x": t}}, p, strict=False)
    assert not t.any()  # nothing was read


def test_a_tensor_at_two_places_is_read_once_from_its_first_place(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"emb": torch.ones(4), "head": torch.ones(4)}, p)
    tied = torch.zeros(4)
    info = dc.LoadInfo()
    dc.load({"emb": tied, "head": tied}, p, info=info)
    assert torch.equal(tied, torch.ones(4))


# -- numpy ----------------------------------------------------------------------


def test_numpy_arrays_and_scalars_come_back_as_numpy(tmp_path):
    p = str(tmp_path / "ck")
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i8": np.array([-1, 2], dtype=np.int8),
        "b": np.array([True, False]),
        "u16": np.arange(3, dtype=np.uint16),
        "c": np.ones(2, dtype=np.complex64),
        "zero_d": np.array(3.5),
        "strided": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
        "big_endian": np.arange(3, dtype=">i4"),
    }
    scalars = {"s_f32": np.float32(1.25), "s_i64": np.int64(-7), "s_u8": np.uint8(200), "s_b": np.bool_(True), "s_f16": np.float16(0.1)}
    dc.save({**arrays, **scalars, "mixed": [np.float64(2.5), 3]}, p)
    target = {k: np.zeros_like(v) for k, v in arrays.items()} | {k: type(v)(0) for k, v in scalars.items()} | {"mixed": [0.0, 0]}
    out = dc.load(target, p)
    for k, v in {**arrays, **scalars}.items():
        assert type(out[k]) is type(v) and out[k].dtype == v.dtype.newbyteorder("=") and np.shape(out[k]) == np.shape(v) and np.array_equal(out[k], v), k
    assert type(out["mixed"][0]) is np.float64 and out["mixed"] == [2.5, 3]
    with dc.make_sync_checkpointer() as ck:
        full = ck.load(p)  # no target: numpy too, from the manifest's marker
    assert type(full["f32"]) is np.ndarray and full["f32"].dtype == np.float32 and type(full["s_u8"]) is np.uint8
    assert type(full["mixed"][1]) is int


def test_numpy_saved_into_plain_targets_and_rank_local_numpy(tmp_path):
    p = str(tmp_path / "ck")
    dc.save({"a": np.arange(3, dtype=np.int32), "pos": dc.rank_local(np.int64(5)), "t": torch.ones(2)}, p)
    out = dc.load({"a": None, "pos": dc.rank_local(0), "t": torch.zeros(2)}, p)
    assert out["a"].dtype == np.int32 and out["a"].tolist() == [0, 1, 2]
    assert isinstance(out["pos"], dc.RankLocal) and type(out["pos"].value) is np.int64 and out["pos"].value == 5


@pytest.mark.parametrize("value", [{1, 2}, np.array(["a", "b"]), np.array([object()]), np.complex64(1j), np.datetime64("2020-01-01"), np.longdouble(1)])
def test_sets_and_other_numpy_kinds_keep_the_clear_refusal(tmp_path, value):
    with pytest.raises(dc.StateDictError, match=r"^x: "):
        dc.save({"x": value}, str(tmp_path / "ck"))


def test_a_crafted_numpy_marker_is_refused_not_trusted(tmp_path):
    from dist_ckpt.flatten import check_structure

    check_structure(["d", ["x"], [["n", "float32"]]])
    for bad in (["n", "object"], ["n", "O"], ["n"], ["n", 1], ["n", "float32", 0]):
        with pytest.raises(dc.ManifestError):
            check_structure(["d", ["x"], [bad]])


# -- fresh optimizer, README patterns --------------------------------------------


def _model_and_adam(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _train_steps(model, opt, n):
    for i in range(n):
        model(torch.full((2, 4), float(i + 1))).sum().backward()
        opt.step()
        opt.zero_grad()


def test_fresh_optimizer_loads_its_saved_state_directly(tmp_path):
    model, opt = _model_and_adam(0)
    _train_steps(model, opt, 3)
    dc.save({"model": model, "optim": opt}, str(tmp_path / "ck"))
    model2, opt2 = _model_and_adam(1)
    assert opt2.state_dict()["state"] == {}
    dc.load({"model": model2, "optim": opt2}, str(tmp_path / "ck"))
    saved, loaded = opt.state_dict(), opt2.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for i, st in saved["state"].items():
        for name, v in st.items():
            assert torch.equal(loaded["state"][i][name], v), (i, name)
    _train_steps(model, opt, 2)
    _train_steps(model2, opt2, 2)  # resumed training matches the uninterrupted run bit for bit
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_fresh_optimizer_over_different_parameters_is_refused_naming_the_pattern(tmp_path):
    model, opt = _model_and_adam(0)
    _train_steps(model, opt, 1)
    dc.save({"optim": opt}, str(tmp_path / "ck"))
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 4))  # same count, other shapes
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    with pytest.raises(dc.LoadMismatchError, match="get_state_dict / set_state_dict"):
        dc.load({"optim": opt2}, str(tmp_path / "ck"))


def test_inspect_shows_a_checkpoint_holding_numpy(tmp_path, capsys):
    from dist_ckpt.cli import main

    dc.save({"a": np.arange(3, dtype=np.int32), "s": np.float32(2.0), "l": [np.int8(1)]}, str(tmp_path / "ck"))
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "int32" in out and "[3]" in out


def test_place_values_copies_only_shared_containers():
    from collections import OrderedDict

    from dist_ckpt.flatten import place_values

    shared, own, also = OrderedDict(v=0), [0, 0], [0]
    root = {"a": shared, "b": [shared], "c": also, "d": (also, 5), "e": own}
    out = place_values(root, {("a", "v"): 1, ("b", 0, "v"): 2, ("c", 0): 3, ("e", 1): 4})
    assert out is root and root["e"] is own and own == [0, 4]  # reached once: filled in place
    assert also == [0] and root["c"] == [3] and root["d"] == ([0], 5) and root["d"][0] is also
    assert shared == OrderedDict(v=0) and type(root["a"]) is OrderedDict and root["a"] == {"v": 1} and root["b"][0] == {"v": 2}
