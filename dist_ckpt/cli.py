"""The ``dist-ckpt`` command: list, inspect, verify, convert and clean up checkpoints.

Every subcommand is a small function ``_cmd_<name>(args) -> exit code`` over
the library (:mod:`dist_ckpt.loader`, :mod:`dist_ckpt.verify`,
:mod:`dist_ckpt.convert`). Exit codes: 0 success, 1 a failed check or a
refused operation (message on stderr as ``dist-ckpt: error: ...``, no
traceback), 2 bad arguments (argparse). ``inspect`` never unpickles anything.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import CheckpointNotFound, DistCkptError, ManifestError
from .flatten import KeyPath, format_path
from .layout_names import MANIFEST, SUFFIX_RE
from .loader import read_manifest, read_metadata_at
from .manifest import Manifest, Pickled, TensorEntry
from .root_scan import BAD, COMMITTED, FOREIGN, INCOMPLETE, OLD, TMP, Entry, scan_root
from .storage import Storage, Usage, get_storage, strip_scheme

PROG = "dist-ckpt"


# -- formatting -------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``5400`` -> ``"1h"`` (coarse, for listings)."""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _value_text(value: Any) -> str:
    """A stored object for display; pickled bytes are described, never unpickled."""
    if isinstance(value, Pickled):
        return f"<pickled {len(value.data)} bytes>"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> Any:
    """A decoded msgpack value as strict JSON (bytes and pickles described, non-finite floats as text)."""
    if isinstance(value, Pickled):
        return {"pickled_bytes": len(value.data)}
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _bar_size() -> dict[str, int]:
    """``{}`` (tqdm follows the terminal), or 80 x 24 on a terminal that reports no size
    (a fresh pseudo-terminal, ``script``, some CI runners), where tqdm would draw nothing."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {}
    return {} if size.columns > 0 and size.lines > 0 else {"ncols": size.columns or 80, "nrows": size.lines or 24}


@contextmanager
def _progress_bar(desc: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (off when stderr is not a TTY)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: work without it
        yield lambda done, total: None
        return

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=None if enabled else True, **_bar_size())

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()  # show the size at once, not at the next throttled update
        bar.update(done - bar.n)
        if done >= total:
            bar.refresh()  # the last update may fall inside tqdm's mininterval

    try:
        yield update
    finally:
        bar.close()


# -- ls ---------------------------------------------------------------------------


@dataclass
class _Dir:
    name: str
    state: str  # committed | incomplete | old | invalid | bad | foreign (see dist_ckpt.root_scan)
    size: int | None  # None: the storage tells no sizes (Storage.entry_usage)
    world_size: int | None
    time: float | None  # manifest creation, else the entry's last change (None: unknown)
    step: int | None
    changed: float | None  # the entry's last change (gc --min-age); None: unknown
    detail: str = ""  # why a committed one is invalid, what a foreign one holds


_STATES = {COMMITTED: "committed", INCOMPLETE: "incomplete", TMP: "incomplete", OLD: "old", BAD: "bad", FOREIGN: "foreign"}


def _join(root: str, name: str) -> str:
    """``root/name`` for a path or a URL (``s3://bucket`` too)."""
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def _describe_dir(storage: Storage, root: str, entry: Entry, usage: Usage | None) -> _Dir:
    """``ls``'s row for one entry of the shared root scan (reads the MANIFEST of committed ones)."""
    path = _join(root, entry.name)
    changed = usage.mtime if usage is not None else None
    d = _Dir(entry.name, _STATES[entry.kind], usage.nbytes if usage is not None else None, None, changed, entry.step, changed, entry.detail)
    if entry.kind in (COMMITTED, OLD) and storage.exists(f"{strip_scheme(path)}/{MANIFEST}"):
        try:
            # one storage (and S3 client) for the whole listing; the MANIFEST alone (a v2 one's fragments are not needed)
            meta, _, _ = read_metadata_at(strip_scheme(path), storage)
            d.world_size, d.time = meta.world_size, meta.created
        except (ManifestError, OSError) as e:  # one bad step must not break the listing of the others
            d.state, d.detail = ("invalid" if entry.kind == COMMITTED else d.state), str(e)
    return d


def _scan(root: str, storage: Storage | None = None) -> list[_Dir]:
    """``ls``'s rows for ``root`` (``storage``: the backend to use, else chosen by scheme).

    Raises:
        FileNotFoundError: ``root`` is not a directory (or nothing is stored under the prefix).
    """
    storage, path = get_storage(root, storage)
    path = path.rstrip("/") or "/"
    try:
        storage.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(2, "no such directory", root) from None
    usage = storage.entry_usage(path)
    return [_describe_dir(storage, root, e, usage.get(e.name)) for e in scan_root(storage, path)]


def _newest(dirs: Sequence[_Dir]) -> _Dir | None:
    """The newest committed checkpoint: highest step, else (no step dirs) latest creation."""
    committed = [d for d in dirs if d.state == "committed"]
    steps = [d for d in committed if d.step is not None]
    if steps:
        return max(steps, key=lambda d: d.step or 0)
    return max(committed, key=lambda d: d.time or 0.0, default=None)


def _cmd_ls(args: argparse.Namespace) -> int:
    dirs = _scan(args.root)
    if not dirs:
        print(f"no checkpoints in {args.root}")
        return 0
    newest, now = _newest(dirs), time.time()
    width = max(len(d.name) for d in dirs)
    print(f"  {'NAME':<{width}}  {'STATE':<10}  {'SIZE':>10}  {'WORLD':>5}  AGE")
    for d in dirs:
        mark = "*" if d is newest else " "
        world = str(d.world_size) if d.world_size is not None else "-"
        size = human_bytes(d.size) if d.size is not None else "-"
        age = human_age(now - d.time) if d.time is not None else "-"
        print(f"{mark} {d.name:<{width}}  {d.state:<10}  {size:>10}  {world:>5}  {age}")
    for d in dirs:
        if d.state in ("foreign", "invalid"):
            hint = f"holds {d.detail}; not a dist_ckpt checkpoint, left alone by gc" if d.state == "foreign" else d.detail
            print(f"{d.name}: {hint}")
    if newest is not None:
        print(f"newest committed: {newest.name}")
    return 0


# -- inspect ----------------------------------------------------------------------


def _part(key: str | int) -> str:
    return f"[{key}]" if type(key) is int else (key if isinstance(key, str) and key.isidentifier() else repr(key))


def _rank_local(manifest: Manifest, key: KeyPath) -> list[tuple[int, TensorEntry | None, Any]]:
    out: list[tuple[int, TensorEntry | None, Any]] = []
    for r, sec in sorted(manifest.local.items()):
        if key in sec.tensors:
            out.append((r, sec.tensors[key], None))
        elif key in sec.objects:
            out.append((r, None, sec.objects[key]))
    return out


def _tensor_text(e: TensorEntry) -> str:
    n = len(e.chunks)
    return f"{e.dtype} {list(e.shape)}  {n} chunk{'s' if n != 1 else ''}  {human_bytes(e.nbytes)}"


def _leaf_text(manifest: Manifest, key: KeyPath) -> str:
    if key in manifest.tensors:
        return _tensor_text(manifest.tensors[key])
    if key in manifest.objects:
        return "= " + _value_text(manifest.objects[key])
    per_rank = _rank_local(manifest, key)
    if not per_rank:
        return "(missing from the manifest)"
    r, entry, obj = per_rank[0]
    first = _tensor_text(entry) if entry is not None else "= " + _value_text(obj)
    return f"rank-local on {len(per_rank)} rank(s); rank {r}: {first}"


def _tree_lines(manifest: Manifest, node: Any, path: KeyPath, depth: int, out: list[tuple[str, str]]) -> None:
    """``(indented name, description)`` per line, walking the structure (format in dist_ckpt.flatten)."""
    if node == 0 or node[0] == "n":  # ["n", dtype]: a leaf saved from numpy
        out.append(("  " * max(0, depth - 1) + (_part(path[-1]) if path else "<root>"), _leaf_text(manifest, path)))
        return
    tag, keys, children = (node[0], node[1], node[2]) if node[0] == "d" else (node[0], range(len(node[1])), node[1])
    if path:
        empty = {"d": "{}", "l": "[]", "t": "()"}[tag] if not children else ""
        out.append(("  " * (depth - 1) + _part(path[-1]), empty))
    for k, child in zip(keys, children):
        _tree_lines(manifest, child, path + (k,), depth + 1, out)


def _inspect_json(manifest: Manifest, root: str) -> dict[str, Any]:
    sections: list[tuple[int | None, Any]] = [(None, manifest)] + sorted(manifest.local.items())
    tensors, objects = [], []
    for rank, sec in sections:
        for key, e in sec.tensors.items():
            tensors.append(
                {
                    "key": list(key),
                    "name": format_path(key),
                    "rank": rank,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "chunks": len(e.chunks),
                    "nbytes": e.nbytes,
                }
            )
        for key, v in sec.objects.items():
            kind = "pickled" if isinstance(v, Pickled) else type(v).__name__
            objects.append({"key": list(key), "name": format_path(key), "rank": rank, "type": kind, "value": _jsonable(v)})
    return {
        "path": root,
        "format_version": manifest.version,
        "fragments": sum(f is not None for f in manifest.fragments),
        "fragments_nbytes": sum(f.nbytes for f in manifest.fragments if f is not None),
        "world_size": manifest.world_size,
        "created": manifest.created,
        "files": list(manifest.files),
        "nbytes": sum(t["nbytes"] for t in tensors),
        "user_meta": _jsonable(dict(manifest.user_meta)),
        "tensors": tensors,
        "objects": objects,
        "structure": manifest.structure,
    }


def _as_given(path: str, stripped: str) -> str:
    """``stripped`` (a storage path) written as the user wrote ``path``: with its ``scheme://`` if it had one."""
    return f"{path.split('://', 1)[0]}://{stripped}" if "://" in path else stripped


def _what_it_is(path: str, cmd: str) -> str | None:
    """What ``path`` is when it is not a checkpoint, and what to run instead (None: nothing to say)."""
    storage, p = get_storage(path)
    p = p.rstrip("/") or "/"
    if storage.exists(f"{p}/.metadata"):
        return f"{path} is a DCP checkpoint, not a dist_ckpt one: convert it with `{PROG} convert {path} DST --to dist_ckpt --trust-pickle`"
    if ("://" not in path or path.startswith("file://")) and os.path.isfile(p):
        kind = "a safetensors file" if p.endswith(".safetensors") else "a file, not a checkpoint directory (a torch.save file?)"
        return f"{path} is {kind}: convert it with `{PROG} convert {path} DST --to dist_ckpt`"
    parent = os.path.dirname(p)
    if os.path.basename(p) == "data" and storage.exists(os.path.join(parent, MANIFEST)):
        return f"{path} is the data folder of the checkpoint {_as_given(path, parent)}: run `{PROG} {cmd} {_as_given(path, parent)}`"
    dirs = [e for e in scan_root(storage, p) if e.kind == COMMITTED]  # a missing root scans as empty
    if dirs:
        newest = max(dirs, key=lambda e: (e.step is not None, e.step or 0, e.name))
        return (
            f"{path} is a checkpoint root holding {len(dirs)} checkpoint(s): list them with `{PROG} ls {path}`, "
            f"then e.g. `{PROG} {cmd} {_as_given(path, p)}/{newest.name}`"
        )
    return None


@contextmanager
def _explained(path: str, cmd: str) -> Iterator[None]:
    """Re-raise ``CheckpointNotFound`` for ``path`` with what it is and what to run instead, when known.

    Raises:
        CheckpointNotFound: nothing committed at ``path``.
    """
    try:
        yield
    except CheckpointNotFound as e:
        hint = _what_it_is(path, cmd)
        if hint is None:
            raise
        raise CheckpointNotFound(hint) from e


def _cmd_inspect(args: argparse.Namespace) -> int:
    with _explained(args.ckpt, "inspect"):
        manifest, root, _ = read_manifest(args.ckpt)
    root = _as_given(args.ckpt, root)
    if args.json:
        print(json.dumps(_inspect_json(manifest, root), indent=1))
        return 0
    info = _inspect_json(manifest, root)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created))
    print(f"checkpoint  {root}")
    print(f"committed   {created} ({human_age(time.time() - manifest.created)} ago), world size {manifest.world_size}")
    if manifest.version > 1:
        print(f"format      version {manifest.version}: {info['fragments']} fragment(s), {human_bytes(info['fragments_nbytes'])} of chunk records")
    print(f"data        {len(info['tensors'])} tensors, {human_bytes(info['nbytes'])} in {len(manifest.files)} file(s); {len(info['objects'])} objects")
    if manifest.user_meta:
        print(f"user_meta   {_value_text(dict(manifest.user_meta))}")
    lines: list[tuple[str, str]] = []
    _tree_lines(manifest, manifest.structure, (), 0, lines)
    width = min(60, max((len(name) for name, _ in lines), default=0))
    print()
    for name, desc in lines:
        print(f"{name:<{width}}  {desc}".rstrip())
    return 0


# -- verify -----------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    with _explained(args.ckpt, "verify"), _progress_bar("verify", not args.no_progress) as progress:
        report = verify(args.ckpt, workers=args.workers, progress=progress)
    rate = report.bytes_checked / max(report.seconds, 1e-9)
    summary = f"{report.chunks_checked} chunks, {human_bytes(report.bytes_checked)} checked in {report.seconds:.2f} s ({human_bytes(rate)}/s)"
    if report.ok:
        print(f"OK  {_as_given(args.ckpt, report.path)}: {summary}")
        return 0
    print(f"FAILED  {_as_given(args.ckpt, report.path)}: {len(report.bad)} bad chunk(s) of {summary}")
    for b in report.bad:
        owner = f" (rank {b.rank})" if b.rank is not None else ""
        print(f"  {format_path(b.key)}{owner}  file {b.file}  offset {b.offset}  {b.nbytes} bytes  {b.reason}: {b.detail}")
    return 1


# -- convert ----------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    with _progress_bar("convert", not args.no_progress) as progress:
        result = convert(
            args.src,
            args.dst,
            args.to,
            trust_pickle=args.trust_pickle,
            pickle_objects=args.pickle_objects,
            rank=args.rank,
            progress=progress,
            select=args.select,
            strip_prefix=args.strip_prefix,
            format_version=args.format_version,
        )
    print(f"wrote {result.dst} ({result.to}) from {result.src_format}: {result.tensors} tensors, {human_bytes(result.nbytes)}, {result.objects} objects")
    if result.skipped:
        print(
            f"{PROG}: warning: {len(result.skipped)} value(s) not representable in {result.to} were left out: {', '.join(result.skipped[:20])}", file=sys.stderr
        )
    return 0


# -- gc ---------------------------------------------------------------------------


def gc_plan(root: str, keep_last: int | None, min_age: float = 0.0) -> list[tuple[str, str]]:
    """``(directory name, reason)`` for everything ``gc`` removes under ``root``.

    Removed, and only what this library could have left (see
    :mod:`dist_ckpt.root_scan`): unfinished saves (``*.tmp-*``), ``*.old-*``
    left by an overwrite whose final directory is committed (without it the
    old one is the only complete copy and is kept), step directories holding
    only our data layout without MANIFEST, and with ``keep_last`` committed
    ``step-*`` directories beyond the newest ``keep_last``. The newest
    committed step is never removed; foreign directories (a DCP checkpoint
    named ``step-N``) and ``*.bad-*`` ones are reported by :func:`gc_kept`
    and left alone. Directories modified less than ``min_age`` seconds ago are
    left alone (a save may be writing them), and so is any entry whose age the
    storage does not tell when ``min_age`` is given.
    """
    return _plan(_scan(root), keep_last, min_age)


def _plan(dirs: list[_Dir], keep_last: int | None, min_age: float) -> list[tuple[str, str]]:
    """:func:`gc_plan` of one scan's rows."""
    newest = _newest(dirs)
    committed = {d.name for d in dirs if d.state in ("committed", "invalid")}
    now = time.time()
    out = []
    for d in dirs:
        if d is newest or (min_age > 0 and (d.changed is None or now - d.changed < min_age)):
            continue
        m = SUFFIX_RE.match(d.name)
        if f".{TMP}-" in d.name:  # also an un-commit of an .old-* copy that was interrupted
            out.append((d.name, "unfinished save"))
        elif d.state == "old" and m is not None and m.group("base") in committed:
            out.append((d.name, f"left over from an overwrite of {m.group('base')}"))
        elif d.step is not None and d.state == "incomplete":
            out.append((d.name, f"no {MANIFEST} (never committed)"))
    if keep_last is not None:
        steps = sorted((d for d in dirs if d.step is not None and d.state in ("committed", "invalid")), key=lambda d: d.step or 0)
        out += [(d.name, f"retention: keeping the last {keep_last}") for d in steps[: max(0, len(steps) - keep_last)] if d is not newest]
    return out


def gc_kept(root: str) -> list[tuple[str, str]]:
    """``(directory name, why)`` of step-named directories ``gc`` leaves alone because this library did not write them."""
    return _kept(_scan(root))


def _kept(dirs: list[_Dir]) -> list[tuple[str, str]]:
    """:func:`gc_kept` of one scan's rows."""
    out = []
    for d in dirs:
        if d.state == "foreign":
            out.append((d.name, f"holds {d.detail}, not a dist_ckpt checkpoint"))
        elif d.state == "bad":
            out.append((d.name, "set aside by a resume that could not load it; remove it by hand after a look"))
    return out


def _has_own_garbage(storage: Storage) -> bool:
    """Whether the backend has garbage of its own beyond what the root scan finds (S3: unreferenced objects)."""
    return type(storage).collect_garbage is not Storage.collect_garbage


def _takes_gc_options(storage: Storage) -> bool:
    """Whether the backend's ``collect_garbage`` takes ``dry_run`` and ``min_age_s`` (a plugin's may take ``root`` alone)."""
    params = inspect.signature(storage.collect_garbage).parameters
    return "dry_run" in params and "min_age_s" in params


def _collect_garbage(storage: Storage, path: str, args: argparse.Namespace) -> list[str]:
    """Run the backend's garbage collection under the root (previewed with ``--dry-run``, sparing ``--min-age``); what it removed."""
    if not _has_own_garbage(storage):
        return []
    what = f"objects no {MANIFEST} references (and unfinished uploads)"
    if not _takes_gc_options(storage) and (args.dry_run or args.min_age > 0):
        # It cannot preview, and it cannot tell a save in flight from a dead one's leftovers: it must run with no save in flight.
        why = (
            "--dry-run" if args.dry_run else "--min-age: it removes every unreferenced object, a save in flight's too; run gc without it once no job saves here"
        )
        print(f"{what}: not collected ({why})")
        return []
    removed = storage.collect_garbage(path, dry_run=args.dry_run, min_age_s=args.min_age) if _takes_gc_options(storage) else storage.collect_garbage(path)
    for url in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {url}  (no {MANIFEST} references it)")
    if args.min_age > 0:
        print(f"{what} younger than {args.min_age:g} s: not collected (--min-age: a save in flight may own them)")
    if args.dry_run:
        print(f"{what}: {len(removed)} would be removed, not collected (--dry-run)")
    return removed


def _cmd_gc(args: argparse.Namespace) -> int:
    storage, path = get_storage(args.root)
    dirs = _scan(args.root, storage)  # one scan (and one S3 client) for the plan, the report and the removal
    plan = _plan(dirs, args.keep_last, args.min_age)
    for name, why in _kept(dirs):
        print(f"left alone {name}  ({why})")
    sizes = {d.name: d.size or 0 for d in dirs}
    freed = 0
    for name, reason in plan:
        size = sizes[name]
        if not args.dry_run:
            storage.uncommit(f"{path.rstrip('/')}/{name}")  # the one un-commit path: never a MANIFEST beside missing data
        freed += size
        print(f"{'would remove' if args.dry_run else 'removed'} {name}  ({reason}, {human_bytes(size)})")
    garbage = _collect_garbage(storage, path.rstrip("/"), args)
    if not plan and not garbage:
        print(f"nothing to remove in {args.root}")
        return 0
    verb = "would free" if args.dry_run else "freed"
    extra = f"; {len(garbage)} unreferenced object(s) or upload(s)" if garbage else ""
    print(f"{len(plan)} director{'y' if len(plan) == 1 else 'ies'}, {verb} {human_bytes(freed)}{extra}")
    return 0


# -- parser -----------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ckpt_path(text: str) -> str:
    """A path or URL with a storage backend (checked here so that a bad scheme is a usage error)."""
    from .storage import get_storage

    try:
        get_storage(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _sub(subs: Any, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The ``dist-ckpt`` argument parser (one subparser per command)."""
    from .convert import FORMATS, trust_message

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify, convert and clean up dist_ckpt checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dist-ckpt ls /ckpts\n  dist-ckpt verify /ckpts/step-00001000\n  dist-ckpt <command> --help",
    )
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _sub(
        subs,
        "ls",
        "List the checkpoints under ROOT: state, size, world size, age; * marks the newest committed.",
        "  dist-ckpt ls /ckpts\n  dist-ckpt ls s3://bucket/run   # AWS_* variables: credentials, region, AWS_ENDPOINT_URL\n\nSTATE is committed (has MANIFEST), incomplete (no MANIFEST, or a .tmp- save), old (moved\naside by an interrupted overwrite) or invalid (unreadable MANIFEST).",
    )
    s.add_argument("root", metavar="ROOT", type=_ckpt_path, help="directory (or s3://bucket/prefix) holding step-XXXXXXXX checkpoints")
    s.set_defaults(func=_cmd_ls)

    s = _sub(
        subs,
        "inspect",
        "Show a checkpoint's keys as a tree: dtype, global shape, chunks, bytes, and its values.",
        "  dist-ckpt inspect /ckpts/step-00001000\n  dist-ckpt inspect /ckpts/step-00001000 --json | jq '.tensors[].name'\n\nPickled values are shown as <pickled N bytes> and are never unpickled.",
    )
    s.add_argument("ckpt", metavar="CKPT", type=_ckpt_path, help="checkpoint directory or s3://bucket/prefix")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.set_defaults(func=_cmd_inspect)

    s = _sub(
        subs,
        "verify",
        "Re-read every chunk and check its xxh3-64 checksum; exit 1 listing bad chunks.",
        "  dist-ckpt verify /ckpts/step-00001000\n  dist-ckpt verify /ckpts/step-00001000 --workers 16 --no-progress",
    )
    s.add_argument("ckpt", metavar="CKPT", type=_ckpt_path, help="checkpoint directory or s3://bucket/prefix")
    s.add_argument("--workers", type=_positive, default=4, help="reader/hasher threads (default 4)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_verify)

    s = _sub(
        subs,
        "convert",
        "Convert a checkpoint between dist_ckpt, DCP, torch.save and safetensors.",
        "  dist-ckpt convert /ckpts/step-00001000 /tmp/dcp --to dcp\n"
        "  dist-ckpt convert /ckpts/step-00001000 model.pt --to torch\n"
        "  dist-ckpt convert /ckpts/step-00001000 model.safetensors --to safetensors\n"
        "  dist-ckpt convert /dcp/checkpoint /ckpts/step-00000000 --to dist_ckpt --trust-pickle\n"
        "  dist-ckpt convert model.pt /ckpts/step-00000000 --to dist_ckpt\n"
        "  dist-ckpt convert model.safetensors /ckpts/step-00000000 --to dist_ckpt\n"
        "  dist-ckpt convert /ckpts/step-00001000 model.safetensors --to safetensors --select model --strip-prefix\n\n"
        "SRC is detected: a dist_ckpt checkpoint, a DCP directory (.metadata), a torch.save file or a\n.safetensors file.\n\n"
        + textwrap.fill(
            f"--trust-pickle: {trust_message('dcp')}. A torch.save file is read with torch.load(weights_only=True) "
            "first and needs --trust-pickle only when that refuses it.",
            88,
            break_on_hyphens=False,
        )
        + "\n\n"
        "The torch output needs the whole checkpoint in memory; the others hold about one tensor\nat a time.",
    )
    s.add_argument("src", metavar="SRC", type=_ckpt_path, help="input checkpoint (format detected)")
    s.add_argument("dst", metavar="DST", type=_ckpt_path, help="output path (must not exist)")
    s.add_argument("--to", required=True, choices=FORMATS, help="output format")
    s.add_argument(
        "--trust-pickle", action="store_true", help="allow unpickling: needed to read DCP input, or torch.save input weights_only refuses (it can execute code)"
    )
    s.add_argument("--pickle-objects", action="store_true", help="(--to dist_ckpt) store values that are not msgpack-native pickled instead of refusing")
    s.add_argument("--rank", type=int, default=0, help="(dist_ckpt input) whose rank-local values to take (default 0)")
    s.add_argument("--select", metavar="PREFIX", default=None, help="convert only the values named PREFIX or PREFIX.* (dotted key paths, e.g. model)")
    s.add_argument("--strip-prefix", action="store_true", help="(with --select) drop PREFIX from the names (model.w -> w)")
    s.add_argument(
        "--format-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="(--to dist_ckpt) checkpoint format to write (default: DIST_CKPT_FORMAT_VERSION, else the library's)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_convert)

    s = _sub(
        subs,
        "gc",
        "Remove unfinished saves and, with --keep-last, old committed steps; never the newest committed step.",
        "  dist-ckpt gc /ckpts --dry-run\n  dist-ckpt gc /ckpts --keep-last 3\n  dist-ckpt gc /ckpts --min-age 3600   # while a job may be saving\n"
        "  dist-ckpt gc s3://bucket/run --keep-last 3   # also removes objects no MANIFEST references\n\n"
        "On s3:// roots gc also removes data objects no MANIFEST references and aborts unfinished\n"
        "multipart uploads (a killed save's leftovers); --dry-run lists them, and since a save in flight\n"
        "has no MANIFEST yet, --min-age keeps those written (or begun) more recently than it.",
    )
    s.add_argument("root", metavar="ROOT", type=_ckpt_path, help="directory (or s3://bucket/prefix) holding step-XXXXXXXX checkpoints")
    s.add_argument("--keep-last", type=_positive, default=None, metavar="N", help="keep only the newest N committed step directories")
    s.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    s.add_argument("--min-age", type=float, default=0.0, metavar="SECONDS", help="leave directories modified more recently than this alone (default 0)")
    s.set_defaults(func=_cmd_gc)
    return p


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, DistCkptError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (tests capture it): nothing will flush it
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dist-ckpt`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or bad arguments (2)
        return e.code if isinstance(e.code, int) else 0
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `dist-ckpt inspect … | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except (DistCkptError, OSError) as e:
        print(f"{PROG}: error: {_error_text(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, or input no check foresaw: still one line, the traceback on request
        if os.environ.get("DIST_CKPT_TRACEBACK"):
            raise
        print(f"{PROG}: error: unexpected {type(e).__name__}: {e} (set DIST_CKPT_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
