"""Unit tests for dist_ckpt.flatten: round trips, stateful expansion, paths, validation."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import msgpack
import pytest
import torch
from fuzz_gen import Gen, fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ckpt.errors import ManifestError, StateDictError
from dist_ckpt.flatten import (
    MAX_DEPTH,
    check_structure,
    expand_stateful,
    flatten,
    format_path,
    get_path,
    leaf_paths,
    set_path,
    unflatten,
)


def msgpack_round_trip(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value), strict_map_key=False)


def assert_identical(a: Any, b: Any) -> None:
    """Same container types, same key types and order, and the very same leaf objects."""
    assert type(a) is type(b) or a is b, (a, b)
    if type(a) is dict:
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        for k in a:
            assert_identical(a[k], b[k])
    elif type(a) in (list, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a is b


def assert_msgpack_native(structure: Any) -> None:
    assert type(structure) in (int, str, list), structure
    if type(structure) is list:
        for item in structure:
            assert_msgpack_native(item)


# ---- round trip -------------------------------------------------------------

_leaves = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.builds(object),
    st.builds(lambda: torch.zeros(2)),
)
_keys = st.one_of(st.sampled_from([0, 1, "0", "1", "", "a.b", -1]), st.text(max_size=4), st.integers(-(2**63), 2**64 - 1))
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_flatten_msgpack_unflatten_is_identity(tree: Any) -> None:
    leaves, structure = flatten(tree)
    assert_msgpack_native(structure)
    decoded = msgpack_round_trip(structure)
    check_structure(decoded)
    assert leaf_paths(decoded) == list(leaves)
    assert_identical(unflatten(leaves, decoded), tree)


def test_empty_containers_and_key_types_survive() -> None:
    tree = {0: {}, "0": [], 1: (), "x": [{}, (), [[]]], "y": ((),)}
    leaves, structure = flatten(tree)
    assert leaves == {}
    assert_identical(unflatten({}, msgpack_round_trip(structure)), tree)


def test_optimizer_style_state() -> None:
    t0, t1 = torch.ones(3), torch.zeros(2)
    sd = {"state": {0: {"exp_avg": t0}, 1: {"exp_avg": t1}}, "param_groups": [{"params": [0, 1], "lr": 0.1, "betas": (0.9, 0.99)}]}
    leaves, structure = flatten(sd)
    assert list(leaves) == [
        ("state", 0, "exp_avg"),
        ("state", 1, "exp_avg"),
        ("param_groups", 0, "params", 0),
        ("param_groups", 0, "params", 1),
        ("param_groups", 0, "lr"),
        ("param_groups", 0, "betas", 0),
        ("param_groups", 0, "betas", 1),
    ]
    assert leaves[("state", 0, "exp_avg")] is t0
    assert_identical(unflatten(leaves, msgpack_round_trip(structure)), sd)


def test_bare_leaf_root() -> None:
    leaves, structure = flatten(5)
    assert (leaves, structure) == ({(): 5}, 0)
    assert unflatten(leaves, structure) == 5


def test_ordered_dict_comes_back_as_dict() -> None:
    leaves, structure = flatten(OrderedDict([("b", 1), ("a", 2)]))
    out = unflatten(leaves, structure)
    assert type(out) is dict and list(out.items()) == [("b", 1), ("a", 2)]


def test_unflatten_missing_leaf_names_path() -> None:
    leaves, structure = flatten({"a": [1, 2]})
    del leaves[("a", 1)]
    with pytest.raises(KeyError, match=r"a\[1\]"):
        unflatten(leaves, structure)


# ---- flatten rejects --------------------------------------------------------


@pytest.mark.parametrize("key", [True, False, 1.5, b"k", None, (1,), 2**64])
def test_bad_key_names_path(key: Any) -> None:
    with pytest.raises(StateDictError, match=r"model\.layers\[0\]") as info:
        flatten({"model": {"layers": [{key: 1}]}})
    assert "str or int" in str(info.value)


Point = namedtuple("Point", "x y")


class MyList(list):
    pass


@pytest.mark.parametrize("value", [Point(1, 2), defaultdict(int), MyList([1])])
def test_container_subclass_rejected(value: Any) -> None:
    with pytest.raises(StateDictError, match=r"\['a\.b'\]\[2\].*convert"):
        flatten({"a.b": [0, 1, value]})


def test_cycles_rejected() -> None:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(StateDictError, match="cycle"):
        flatten({"x": loop})


def test_shared_container_is_not_a_cycle() -> None:
    shared = [1]
    leaves, structure = flatten({"a": shared, "b": shared})
    assert list(leaves) == [("a", 0), ("b", 0)]


def test_too_deep_rejected() -> None:
    tree: Any = 0
    for _ in range(MAX_DEPTH + 1):
        tree = [tree]
    with pytest.raises(StateDictError, match="deeper"):
        flatten(tree)
    flatten(tree[0])  # exactly MAX_DEPTH containers is fine, and checks fine
    check_structure(msgpack_round_trip(flatten(tree[0])[1]))


# ---- expand_stateful --------------------------------------------------------


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    optim.step()
    return model, optim


def test_expand_module_and_adamw_round_trip() -> None:
    model, optim = _trained()
    sd = {"model": model, "optim": optim, "epoch": 3}
    expanded, stateful = expand_stateful(sd)
    assert stateful == {("model",): model, ("optim",): optim}
    assert sd["model"] is model  # input untouched
    assert type(expanded["model"]) is dict  # OrderedDict copied as dict
    weight = expanded["model"]["0.weight"]
    assert weight.data_ptr() == model[0].weight.data_ptr()  # leaves not copied
    assert torch.is_tensor(expanded["optim"]["state"][0]["exp_avg"])

    leaves, structure = flatten(expanded)
    assert ("optim", "param_groups", 0, "betas", 1) in leaves
    loaded = unflatten({p: (v.clone() if torch.is_tensor(v) else v) for p, v in leaves.items()}, msgpack_round_trip(structure))

    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optim2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    targets = {("model",): model2, ("optim",): optim2}
    for path in stateful:
        targets[path].load_state_dict(get_path(loaded, path))
    assert torch.equal(model2[2].bias, model[2].bias)
    assert optim2.param_groups[0]["lr"] == 0.01
    assert torch.equal(optim2.state_dict()["state"][1]["exp_avg_sq"], optim.state_dict()["state"][1]["exp_avg_sq"])


class Counter:
    def __init__(self, inner: Any = None) -> None:
        self.n, self.inner = 7, inner

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "children": [self.inner]} if self.inner is not None else {"n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


class StatefulTensor(torch.Tensor):
    def state_dict(self) -> dict[str, Any]:
        raise AssertionError("tensors are leaves")

    def load_state_dict(self, sd: Any) -> None:
        raise AssertionError("tensors are leaves")


def test_expand_nested_stateful_and_leaves() -> None:
    inner = Counter()
    outer = Counter(inner)
    tensor = torch.ones(2).as_subclass(StatefulTensor)
    expanded, stateful = expand_stateful((outer, tensor, Counter, "s"))
    assert expanded == ({"n": 7, "children": [{"n": 7}]}, tensor, Counter, "s")
    assert expanded[1] is tensor
    assert list(stateful.items()) == [((0,), outer), ((0, "children", 0), inner)]


def test_expand_root_stateful() -> None:
    counter = Counter()
    assert expand_stateful(counter) == ({"n": 7}, {(): counter})


def test_expand_stateful_cycle_rejected() -> None:
    counter = Counter()
    counter.inner = counter
    with pytest.raises(StateDictError, match="cycle"):
        expand_stateful({"c": counter})


def test_expand_stateful_returning_stateful_rejected() -> None:
    class Wrapper(Counter):
        def state_dict(self) -> Any:
            return Counter()

    with pytest.raises(StateDictError, match="returned a stateful"):
        expand_stateful({"w": Wrapper()})


# ---- get_path / set_path / format_path ---------------------------------------


def test_set_path_through_dicts_lists_tuples() -> None:
    inner_list = [1, (2, (3, 4))]
    root = {"a": inner_list}
    assert set_path(root, ("a", 1, 1, 0), 99) is root
    assert root["a"] is inner_list  # list mutated in place
    assert root == {"a": [1, (2, (99, 4))]}
    assert get_path(root, ("a", 1, 1, 0)) == 99


def test_set_path_root_tuple() -> None:
    lst = [2]
    root = (1, lst, (3,))
    new = set_path(root, (2, 0), "x")
    assert new == (1, [2], ("x",)) and new is not root and new[1] is lst
    assert set_path(new, (1, 0), "y") is new and lst == ["y"]
    assert set_path(new, (), "z") == "z"


@pytest.mark.parametrize("path", [("b",), ("a", 5), ("a", -1), ("a", "0"), ("a", 0, "deeper"), ("t", 2)])
def test_get_set_missing_path(path: tuple) -> None:
    root = {"a": [1], "t": (1, 2)}
    with pytest.raises(KeyError):
        get_path(root, path)
    with pytest.raises(KeyError):
        set_path(root, path, 0)
    assert root == {"a": [1], "t": (1, 2)}


def test_format_path() -> None:
    assert format_path(("model", "layers", 0, "weight")) == "model.layers[0].weight"
    assert format_path(("a.b", "0", 0, "x")) == "['a.b']['0'][0].x"
    assert format_path((3, "x")) == "[3].x"
    assert format_path(()) == "<root>"


_path_keys = st.one_of(st.integers(-3, 3), st.text(alphabet="a0.[]'\"", max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(_path_keys, max_size=4), st.lists(_path_keys, max_size=4))
def test_format_path_unambiguous(a: list, b: list) -> None:
    if tuple(a) != tuple(b) or [type(k) for k in a] != [type(k) for k in b]:
        assert format_path(tuple(a)) != format_path(tuple(b))


# ---- check_structure ----------------------------------------------------------


class AnyLeaf(dict):
    """Leaves for any path: None."""

    def __missing__(self, key: Any) -> None:
        return None


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.sampled_from(["d", "l", "t", 0, 0, 0.0, False]),
)
_msgpackish = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(st.sampled_from(["d", "l", "t"]), st.lists(children, max_size=3)).map(list),
        st.tuples(st.just("d"), st.lists(children, max_size=3), st.lists(children, max_size=3)).map(list),
        st.dictionaries(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=3), st.binary(max_size=3)), children, max_size=3),
    ),
    max_leaves=20,
)


def structure_checked_or_usable(value: Any) -> None:
    """``check_structure`` refuses ``value`` with a ``ManifestError``, or it unflattens."""
    for candidate in (value, msgpack_round_trip(value)):
        try:
            check_structure(candidate)
        except ManifestError:
            continue
        unflatten(AnyLeaf(), candidate)  # a structure that passes must be usable


# 150 hypothesis examples (~15 ms each here); the seeded twin below runs 10,000 in about a second (fuzz_gen.py).
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_msgpackish)
def test_check_structure_only_raises_manifest_error(value: Any) -> None:
    structure_checked_or_usable(value)


def _seeded_msgpackish(g: Gen) -> Any:
    """What ``_msgpackish`` draws: scalars and tag strings in lists, tagged nodes (``["d", keys, values]``...) and maps."""
    budget = [g.randint(1, 20)]

    def leaf() -> Any:
        return g.choice(["d", "l", "t", 0, 0, 0.0, False]) if g.random() < 1 / 7 else g.scalar(4, 4)

    def items(n: int) -> list:
        return [node() for _ in range(g.randint(0, n)) if budget[0] > 0]

    def key() -> Any:
        return g.choice([g.integer, lambda: g.text(3), lambda: g.binary(3)])()

    def node() -> Any:
        if budget[0] <= 1 or g.random() < 0.4:
            budget[0] -= 1
            return leaf()
        kind = g.randrange(4)
        if kind == 0:
            return items(4)
        if kind == 1:
            return [g.choice(["d", "l", "t"]), items(3)]
        if kind == 2:
            return ["d", items(3), items(3)]
        return {key(): node() for _ in range(g.randint(0, 3)) if budget[0] > 0}

    return node()


def test_check_structure_only_raises_manifest_error_seeded() -> None:
    fuzz("check_structure", _seeded_msgpackish, structure_checked_or_usable)


def _slots(node: Any) -> list[tuple[list, int]]:
    """Every (list, index) position inside a structure, tags and key lists included."""
    if type(node) is not list:
        return []
    return [(node, i) for i in range(len(node))] + [slot for child in node for slot in _slots(child)]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees, st.data())
def test_check_structure_on_mutated_valid_structures(tree: Any, data: st.DataObject) -> None:
    structure = msgpack_round_trip(flatten(tree)[1])
    slots = _slots(structure)
    if slots:
        container, index = data.draw(st.sampled_from(slots))
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        if action == "delete":
            del container[index]
        else:
            garbage = data.draw(_msgpackish)
            container[index : index + (action == "replace")] = [garbage]
    else:
        structure = data.draw(_msgpackish)
    try:
        check_structure(structure)
    except ManifestError:
        return
    unflatten(AnyLeaf(), structure)


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "expected 0"),
        (False, "expected 0"),
        (0.0, "expected 0"),
        (1, "expected 0"),
        ([], "expected 0"),
        (["x", []], "expected 0"),
        ([["l"], []], "expected 0"),
        (["l"], "tag then 1"),
        (["l", [], []], "tag then 1"),
        (["d", [], {}], "tag then 2"),
        (["d", ["a"], []], "1 keys but 0 children"),
        (["d", [True], [0]], "bad dict key True"),
        (["d", [1.0], [0]], "bad dict key"),
        (["d", [b"a"], [0]], "bad dict key"),
        (["d", [[1]], [0]], "bad dict key list"),
        (["d", ["a", "a"], [0, 0]], "duplicate"),
        (["d", ["a"], [["l", [0, ["t", [1]]]]]], r"a\[1\]\[0\]"),
        ({"d": 1}, "got dict"),
    ],
)
def test_check_structure_messages(bad: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        check_structure(bad)
    with pytest.raises(ManifestError):
        unflatten(AnyLeaf(), bad)
    with pytest.raises(ManifestError):
        leaf_paths(bad)


def test_check_structure_hostile_depth() -> None:
    deep: Any = 0
    for _ in range(5000):
        deep = ["l", [deep]]
    for check in (check_structure, leaf_paths, lambda s: unflatten(AnyLeaf(), s)):
        with pytest.raises(ManifestError, match="deeper than 200"):
            check(deep)
    with pytest.raises(ManifestError, match="deeper than 4999"):
        check_structure(deep, max_depth=4999)
    check_structure(deep, max_depth=5000)  # iterative: no RecursionError
    garbage: Any = []
    for _ in range(100_000):
        garbage = [garbage]
    with pytest.raises(ManifestError):
        check_structure(["l", [garbage]])
