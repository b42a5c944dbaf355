"""Nested state dicts to ``{key path: leaf}`` and back.

A state dict is a tree of ``dict``, ``list`` and ``tuple`` containers whose
leaves are anything else (never inspected). :func:`flatten` returns the leaves
by *key path* (dict keys and list indices from the root) and a *structure*,
the compact record of the nesting that the manifest stores so that
:func:`unflatten` rebuilds the exact containers, empty ones included.

Structure encoding (only lists, str and int: msgpack keeps it as is)::

    0                                    a leaf
    ["d", [k1, k2, ...], [s1, s2, ...]]  a dict: keys in order, child structures
    ["l", [s1, s2, ...]]                 a list
    ["t", [s1, s2, ...]]                 a tuple

    ["n", dtype]                         a leaf that was a numpy array or scalar of
                                         that dtype (see :data:`NUMPY_DTYPES`)

Dict keys are str or int (never bool); msgpack keeps ``0`` and ``"0"``
distinct. Sharing is not recorded: a container reached twice comes back as
two copies (and :func:`place_values` gives each place its own copy).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import torch

from .errors import ManifestError, StateDictError, bounded_repr

KeyPath = tuple[str | int, ...]
Structure = int | list[Any]

MAX_DEPTH = 200
"""Containers nest at most this deep: a leaf path has at most this many keys."""

_LEAF = 0
_DICT = "d"
_SEQ_TYPES: dict[str, type] = {"l": list, "t": tuple}
_SEQ_TAGS: dict[type, str] = {kind: tag for tag, kind in _SEQ_TYPES.items()}
_NUMPY = "n"
_NODE_LEN: dict[str, int] = {_DICT: 3, "l": 2, "t": 2, _NUMPY: 2}
NUMPY_DTYPES = frozenset(
    {"float64", "float32", "float16", "complex128", "complex64", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"}
)
"""numpy dtypes a ``["n", dtype]`` leaf may name (a fixed table: a name from a file never reaches ``np.dtype``)."""
_DICT_TYPES = (dict, OrderedDict)  # OrderedDict comes back as a plain dict
_INT_KEY_MIN, _INT_KEY_END = -(2**63), 2**64  # what msgpack can encode


def format_path(path: KeyPath) -> str:
    """Render a key path readably and unambiguously, for messages.

    Identifier str keys print bare, joined by dots; other str keys as
    ``['repr']``; int keys as ``[0]``. Identifiers hold no dots or brackets, so
    distinct paths never print alike: ``("model", "layers", 0, "w")`` ->
    ``model.layers[0].w``; ``("a.b", "0")`` -> ``['a.b']['0']``; ``()`` -> ``<root>``.

    Args:
        path: The key path.

    Returns:
        The rendered path.
    """
    parts: list[str] = []
    for key in path:
        if type(key) is str and key.isidentifier():
            parts.append("." + key if parts else key)
        else:
            parts.append(f"[{key!r}]" if type(key) is str else f"[{bounded_repr(key)}]")
    return "".join(parts) or "<root>"


def _key_ok(key: object) -> bool:
    """Whether ``key`` may be a dict key in a state dict (bool is not an int here)."""
    return type(key) is str or (type(key) is int and _INT_KEY_MIN <= key < _INT_KEY_END)


def _enter(node: object, path: KeyPath, active: set[int]) -> None:
    """Mark ``node`` as being traversed; reject cycles and over-deep nesting."""
    if id(node) in active:
        raise StateDictError(f"cycle in state dict: the value at {format_path(path)} contains itself")
    if len(path) >= MAX_DEPTH:
        raise StateDictError(f"state dict nests deeper than {MAX_DEPTH} containers at {format_path(path)}")
    active.add(id(node))


def _is_stateful(value: object) -> bool:
    """Whether ``value`` saves through ``state_dict()`` (modules, optimizers, Stateful)."""
    if isinstance(value, (torch.Tensor, type)):  # tensors (and DTensor) are leaves; classes are not instances
        return False
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def expand_stateful(sd: Any) -> tuple[Any, dict[KeyPath, Any]]:
    """Replace every stateful object in a container tree by its ``state_dict()``.

    Containers (dict, OrderedDict, list, tuple) are copied, OrderedDict as a
    plain dict; leaves, tensors included, are not. A ``state_dict()`` result is
    expanded in turn, so it may hold further stateful objects.

    Args:
        sd: The user's state dict, or a single stateful object.

    Returns:
        ``(expanded, stateful)``: the copied tree, and each stateful object by the
        path of its state dict in that tree (outer objects first), for the loader
        to call ``obj.load_state_dict(...)`` with the loaded subtree.

    Raises:
        StateDictError: On a cycle, nesting beyond ``MAX_DEPTH``, or a
            ``state_dict()`` that returns a stateful object itself.
    """
    stateful: dict[KeyPath, Any] = {}
    return _expand(sd, (), stateful, set()), stateful


def _expand(node: Any, path: KeyPath, stateful: dict[KeyPath, Any], active: set[int]) -> Any:
    """Expanded copy of ``node`` at ``path``; records stateful objects."""
    if _is_stateful(node):
        _enter(node, path, active)
        stateful[path] = node
        inner = node.state_dict()
        if _is_stateful(inner):  # two objects would claim the same path
            raise StateDictError(f"state_dict() of {type(node).__name__} at {format_path(path)} returned a stateful object")
        out = _expand(inner, path, stateful, active)
    elif type(node) in _DICT_TYPES:
        _enter(node, path, active)
        out = {key: _expand(value, path + (key,), stateful, active) for key, value in node.items()}
    elif type(node) in _SEQ_TAGS:
        _enter(node, path, active)
        out = type(node)(_expand(value, path + (i,), stateful, active) for i, value in enumerate(node))
    else:
        return node
    active.discard(id(node))
    return out


def flatten(sd: Any) -> tuple[dict[KeyPath, Any], Structure]:
    """Flatten nested dicts, lists and tuples into ``{key path: leaf}``.

    Args:
        sd: The state dict, stateful objects expanded. A bare leaf gives ``{(): sd}``.

    Returns:
        ``(leaves, structure)``: leaves in traversal order (dict key order, list
        index order), and the structure record described in the module docstring.

    Raises:
        StateDictError: Naming the path: a dict key not str or int (bool is
            neither), a subclass of dict, list or tuple other than OrderedDict
            (namedtuple, defaultdict, ...), a cycle, or nesting beyond ``MAX_DEPTH``.
    """
    leaves: dict[KeyPath, Any] = {}
    return leaves, _flatten_node(sd, (), leaves, set())


def _flatten_node(node: Any, path: KeyPath, leaves: dict[KeyPath, Any], active: set[int]) -> Structure:
    """Structure of ``node`` at ``path``; appends its leaves to ``leaves``."""
    kind = type(node)
    if kind not in _DICT_TYPES and kind not in _SEQ_TAGS:
        if isinstance(node, (dict, list, tuple)):  # a subclass would silently lose its type
            raise StateDictError(f"{kind.__name__} at {format_path(path)} is a subclass of dict, list or tuple; convert it to a plain one")
        leaves[path] = node
        return _LEAF
    _enter(node, path, active)
    if kind in _DICT_TYPES:
        for key in node:
            if not _key_ok(key):
                raise StateDictError(f"dict at {format_path(path)} has key {bounded_repr(key)} of type {type(key).__name__}; keys must be str or int")
        children = [_flatten_node(value, path + (key,), leaves, active) for key, value in node.items()]
        out: list[Any] = [_DICT, list(node), children]
    else:
        out = [_SEQ_TAGS[kind], [_flatten_node(value, path + (i,), leaves, active) for i, value in enumerate(node)]]
    active.discard(id(node))
    return out


def _parse_node(node: Any, path: KeyPath, max_depth: int) -> tuple[str, Sequence[str | int], list[Any]] | None:
    """Validate one structure node: ``None`` for a leaf, else ``(tag, child keys, children)``."""
    if type(node) is int and node == _LEAF:  # not False, not 0.0
        return None
    if type(node) not in (list, tuple) or not node or type(node[0]) is not str or node[0] not in _NODE_LEN:
        raise ManifestError(f"structure at {format_path(path)}: expected 0 or a list tagged 'd', 'l' or 't', got {bounded_repr(node)}")
    tag = node[0]
    if tag == _NUMPY:
        if len(node) != 2 or type(node[1]) is not str or node[1] not in NUMPY_DTYPES:
            raise ManifestError(
                f"structure at {format_path(path)}: numpy leaf must be ['n', dtype] with a known dtype, got {bounded_repr(node[1] if len(node) > 1 else None)}"
            )
        return None
    if len(node) != _NODE_LEN[tag] or any(type(part) not in (list, tuple) for part in node[1:]):
        raise ManifestError(f"structure at {format_path(path)}: {tag!r} node must be the tag then {_NODE_LEN[tag] - 1} list(s)")
    if len(path) >= max_depth:
        raise ManifestError(f"structure nests deeper than {max_depth} containers at {format_path(path)}")
    if tag != _DICT:
        return tag, range(len(node[1])), list(node[1])
    keys, children = list(node[1]), list(node[2])
    if len(keys) != len(children):
        raise ManifestError(f"structure at {format_path(path)}: dict has {len(keys)} keys but {len(children)} children")
    for key in keys:
        if not _key_ok(key):
            raise ManifestError(f"structure at {format_path(path)}: bad dict key {bounded_repr(key)}")
    if len(set(keys)) != len(keys):
        raise ManifestError(f"structure at {format_path(path)}: duplicate dict keys")
    return tag, keys, children


def mark_leaves(structure: Structure, marks: Mapping[KeyPath, str]) -> Structure:
    """``structure`` with the leaf at each path of ``marks`` replaced by ``["n", dtype]``.

    Args:
        structure: A structure from :func:`flatten` (leaves are ``0``).
        marks: numpy dtype name (one of :data:`NUMPY_DTYPES`) by leaf path.

    Returns:
        The new structure (containers without a marked leaf are shared, not copied).
    """
    return _mark(structure, (), marks, {p[:d] for p in marks for d in range(len(p))}) if marks else structure


def _mark(node: Any, path: KeyPath, marks: Mapping[KeyPath, str], prefixes: set[KeyPath]) -> Any:
    if path in marks:
        return [_NUMPY, marks[path]]
    if path not in prefixes:
        return node
    if node[0] == _DICT:
        return [_DICT, node[1], [_mark(c, path + (k,), marks, prefixes) for k, c in zip(node[1], node[2])]]
    return [node[0], [_mark(c, path + (i,), marks, prefixes) for i, c in enumerate(node[1])]]


def numpy_leaves(structure: Structure) -> dict[KeyPath, str]:
    """The numpy dtype name of every ``["n", dtype]`` leaf, by path (validates like :func:`check_structure`)."""
    out: dict[KeyPath, str] = {}
    stack: list[tuple[Any, KeyPath]] = [(structure, ())]
    while stack:
        node, path = stack.pop()
        parsed = _parse_node(node, path, MAX_DEPTH)
        if parsed is None:
            if type(node) is not int:
                out[path] = node[1]
        else:
            stack.extend((child, path + (key,)) for key, child in zip(parsed[1], parsed[2]))
    return out


def _walk_leaves(structure: object, max_depth: int) -> Iterator[KeyPath]:
    """Leaf paths in traversal order, validating every node on the way.

    Iterative, so no ``max_depth`` a caller picks can exhaust the Python stack.
    """
    stack: list[tuple[Any, KeyPath]] = [(structure, ())]
    while stack:
        node, path = stack.pop()
        parsed = _parse_node(node, path, max_depth)
        if parsed is None:
            yield path
        else:
            _, keys, children = parsed
            stack.extend(reversed([(child, path + (key,)) for key, child in zip(keys, children)]))


def check_structure(structure: object, max_depth: int = MAX_DEPTH) -> None:
    """Validate a structure decoded from an untrusted file.

    Args:
        structure: Any msgpack-decoded value.
        max_depth: Deepest container nesting accepted.

    Raises:
        ManifestError: Anything malformed: unknown tags, wrong types or
            lengths, bad or duplicate dict keys, nesting beyond ``max_depth``.
            Nothing else is raised for msgpack-decodable input.
    """
    for _ in _walk_leaves(structure, max_depth):
        pass


def leaf_paths(structure: Structure) -> list[KeyPath]:
    """Leaf key paths of a structure, in the order :func:`flatten` produced them.

    Raises:
        ManifestError: The structure is malformed (see :func:`check_structure`).
    """
    return list(_walk_leaves(structure, MAX_DEPTH))


def unflatten(leaves: Mapping[KeyPath, Any], structure: Structure) -> Any:
    """Rebuild the containers recorded in ``structure`` around ``leaves``.

    Args:
        leaves: Leaf values by key path, placed as they are (not copied).
            Paths the structure does not name are ignored (see :func:`leaf_paths`).
        structure: A structure from :func:`flatten`, possibly via msgpack.

    Returns:
        The rebuilt tree of dicts, lists and tuples.

    Raises:
        KeyError: A leaf path of the structure is missing from ``leaves``.
        ManifestError: The structure is malformed.
    """
    return _build(structure, (), leaves)


def _build(node: object, path: KeyPath, leaves: Mapping[KeyPath, Any]) -> Any:
    """Rebuilt value of structure ``node`` at ``path`` (recursion bounded by MAX_DEPTH)."""
    parsed = _parse_node(node, path, MAX_DEPTH)
    if parsed is None:
        try:
            return leaves[path]
        except KeyError:
            raise KeyError(f"no leaf for {format_path(path)}") from None
    tag, keys, children = parsed
    values = [_build(child, path + (key,), leaves) for key, child in zip(keys, children)]
    return dict(zip(keys, values)) if tag == _DICT else _SEQ_TYPES[tag](values)


def _chain(root: Any, path: KeyPath) -> list[Any]:
    """``[root, child, grandchild, ...]`` along ``path``; KeyError naming the first absent key."""
    chain = [root]
    for depth, key in enumerate(path):
        node = chain[-1]
        if isinstance(node, dict) and key in node:
            chain.append(node[key])
        elif isinstance(node, (list, tuple)) and type(key) is int and 0 <= key < len(node):  # no negative aliases
            chain.append(node[key])
        else:
            raise KeyError(f"no entry at {format_path(path[: depth + 1])}")
    return chain


def get_path(root: Any, path: KeyPath) -> Any:
    """The value at ``path`` inside ``root`` (``root`` itself for ``()``).

    Raises:
        KeyError: Some key along the path is absent; the message names it.
    """
    return _chain(root, path)[-1]


def set_path(root: Any, path: KeyPath, value: Any) -> Any:
    """Replace the existing value at ``path`` inside the caller's containers.

    Dicts and lists are mutated in place. Each tuple on the way is rebuilt (as
    a plain tuple) and stored in its parent, up to the nearest mutable one.

    Args:
        root: The container tree.
        path: Where to store ``value``; ``()`` replaces the root.
        value: The new value.

    Returns:
        The root: the same object unless it was a tuple that had to be rebuilt.

    Raises:
        KeyError: ``path`` does not name an existing entry.
    """
    chain = _chain(root, path)  # chain[d] is the container indexed by path[d]
    new = value
    for depth in range(len(path) - 1, -1, -1):
        container, key = chain[depth], path[depth]
        if not isinstance(container, tuple):
            container[key] = new
            return root  # ancestors still hold this same container
        assert isinstance(key, int)  # _chain indexes a tuple by int keys only
        new = container[:key] + (new,) + container[key + 1 :]
    return new


def _shared_containers(root: Any) -> set[int]:
    """Ids of the containers in ``root`` reached by more than one key path.

    A container reached once has only ancestors reached once, so filling it in
    place changes no other place; one reached twice must not be (the value of
    one place would show at the other). Stateful objects and other leaves are
    not entered. Iterative: the tree was already checked for cycles and depth.
    """
    seen: set[int] = set()
    shared: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind not in _DICT_TYPES and kind not in _SEQ_TAGS:
            continue
        if id(node) in seen:
            shared.add(id(node))
        seen.add(id(node))
        stack.extend(node.values() if kind in _DICT_TYPES else node)
    return shared


def place_values(root: Any, values: Mapping[KeyPath, Any]) -> Any:
    """Put each value at its path in the caller's containers, never letting two places share one.

    A dict or list reached by one path only is updated in place (as DCP
    does); one reached by several paths (aliased: ``{"x": a, "y": a}``) is
    left untouched and each place gets its own new container holding that
    place's values, so every value lands at its own place and the shared
    object keeps its old contents. Tuples on the way are rebuilt as plain tuples.

    Args:
        root: The container tree (already validated by :func:`flatten`).
        values: New leaf values by key path (paths of :func:`flatten` of ``root``;
            a path naming no entry is ignored).

    Returns:
        The root: the same object unless it was a tuple (or shared) and had to be rebuilt.
    """
    if not values:
        return root
    if () in values:
        return values[()]
    prefixes = {p[:d] for p in values for d in range(len(p))}
    return _place(root, (), values, prefixes, _shared_containers(root))


def _place(node: Any, path: KeyPath, values: Mapping[KeyPath, Any], prefixes: set[KeyPath], shared: set[int]) -> Any:
    kind = type(node)
    if kind in _DICT_TYPES:
        items: Iterator[tuple[Any, Any]] = iter(node.items())
    elif kind in _SEQ_TAGS:
        items = enumerate(node)
    else:
        return node
    new = {}
    for key, child in items:
        sub = path + (key,)
        new[key] = values[sub] if sub in values else _place(child, sub, values, prefixes, shared) if sub in prefixes else child
    if kind is tuple:
        return tuple(new.values())
    if id(node) in shared:  # a fresh container for this place; the shared one keeps its contents
        return kind(new) if kind in _DICT_TYPES else list(new.values())
    for key, value in new.items():
        if node[key] is not value:
            node[key] = value
    return node
