"""What obslib may delete: only what it wrote, checked file by file.

Every directory obslib writes as an output carries ``obslib_files.json``: the list of every file it wrote
in it, at every depth, with its size (and, for files up to 1 MiB, its SHA-256). A directory may be
replaced (``--overwrite``) only when what is in it now is exactly that list: a file a user added at any
depth, a file edited since, a symbolic link or an extra folder makes it someone else's.

The same rule guards the other paths obslib creates and later removes: checkpoint directories
(``obslib/checkpoint.py``), the propagate record's spill directory and the temporary siblings of an atomic
write. Leftovers of a killed run are recognised by their name, which carries the dead process's PID, and
by their contents. Path relations (``inside``, ``overlaps``) are here too, so that every path flag is
refused the same way when it is, contains or lies inside a directory that must survive.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil

FILE_LIST = "obslib_files.json"
WRITTEN_BY = "obslib"
HASH_LIMIT = 2**20  # files up to this size are also compared by SHA-256 (configs and reports a user might edit)


def inside(child: str, parent: str) -> bool:
    """``child`` lies strictly inside ``parent`` (both real, absolute paths)."""
    return child != parent and os.path.commonpath([child, parent]) == parent


def overlap(path: str, other: str) -> str | None:
    """How ``path`` overlaps ``other`` ("is", "inside", "contains") after resolving links, or None."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is"
    if inside(a, b):
        return "inside"
    if inside(b, a):
        return "contains"
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk(root: str):
    """(files, dirs, links) under ``root`` as sorted relative paths; links are never followed."""
    files, dirs, links = [], [], []
    for here, ds, fs in os.walk(root):
        for d in list(ds):
            full = os.path.join(here, d)
            if os.path.islink(full):
                links.append(os.path.relpath(full, root))
                ds.remove(d)
            else:
                dirs.append(os.path.relpath(full, root))
        for f in fs:
            full = os.path.join(here, f)
            (links if os.path.islink(full) or not os.path.isfile(full) else files).append(os.path.relpath(full, root))
    return sorted(files), sorted(dirs), sorted(links)


def describe(root: str) -> dict:
    """The file list of ``root`` as it is now (what ``write_file_list`` records)."""
    files, _, _ = _walk(root)
    out = {}
    for rel in files:
        if rel == FILE_LIST:
            continue
        full = os.path.join(root, rel)
        size = os.path.getsize(full)
        out[rel.replace(os.sep, "/")] = {"bytes": size, "sha256": _sha256(full) if size <= HASH_LIMIT else None}
    return out


def write_file_list(root: str) -> None:
    """Record every file under ``root`` (call it last, when the directory is complete)."""
    write_json(os.path.join(root, FILE_LIST), {"written_by": WRITTEN_BY, "files": describe(root)})


def read_file_list(root: str) -> dict | None:
    f = os.path.join(root, FILE_LIST)
    if not os.path.isfile(f) or os.path.islink(f):
        return None
    try:
        with open(f, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    files = obj.get("files") if isinstance(obj, dict) and obj.get("written_by") == WRITTEN_BY else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              for v in files.values()):
        return None
    return files


def is_listed_unchanged(root: str, rel: str) -> bool:
    """``rel`` (a file obslib wrote in ``root``) is on its file list and unchanged since (size and SHA-256)."""
    entry = (read_file_list(root) or {}).get(rel)
    full = os.path.join(root, rel)
    if entry is None or os.path.islink(full) or not os.path.isfile(full) or not entry.get("sha256"):
        return False
    return os.path.getsize(full) == entry["bytes"] and _sha256(full) == entry["sha256"]


def replace_listed_text(root: str, rel: str, text: str) -> None:
    """Rewrite a text file obslib wrote in ``root`` (check ``is_listed_unchanged`` first) and its entry of the file
    list; the rest of the list is kept as it is. Each write is atomic; a crash between the two leaves the file
    unlisted-as-changed, so the directory counts as someone else's (the safe side)."""
    full = os.path.join(root, rel)
    write_text(full, text)
    f = os.path.join(root, FILE_LIST)
    with open(f, encoding="utf-8") as fh:
        obj = json.load(fh)
    size = os.path.getsize(full)
    obj["files"][rel] = {"bytes": size, "sha256": _sha256(full) if size <= HASH_LIMIT else None}
    write_json(f, obj)


def not_ours(root: str) -> list[str] | None:
    """What under ``root`` obslib did not write: [] when every file at every depth is on its file list,
    unchanged; None when the directory has no (valid) file list at all."""
    listed = read_file_list(root)
    if listed is None:
        return None
    files, dirs, links = _walk(root)
    bad = list(links)
    for rel in files:
        key = rel.replace(os.sep, "/")
        if rel == FILE_LIST:
            continue
        entry = listed.get(key)
        full = os.path.join(root, rel)
        if entry is None:
            bad.append(rel)
            continue
        size = os.path.getsize(full)
        if size != entry["bytes"] or (entry.get("sha256") and size <= HASH_LIMIT and _sha256(full) != entry["sha256"]):
            bad.append(f"{rel} (changed)")
    needed = {os.path.dirname(k) for k in listed}
    needed |= {p for k in needed for p in _parents(k)}
    extra_dirs = [d for d in dirs if d.replace(os.sep, "/") not in needed]
    shown = [b.split(" (")[0] for b in bad]  # a foreign folder is named only when nothing in it is already named
    bad += [d for d in extra_dirs if not any(inside(os.path.join("/", x), os.path.join("/", d)) for x in shown)
            and not any(inside(os.path.join("/", e), os.path.join("/", d)) for e in extra_dirs)]
    return sorted(bad)


def _parents(rel: str):
    while rel:
        rel = os.path.dirname(rel)
        if rel:
            yield rel


def _finite(obj):
    """JSON-safe copy: non-finite floats become null (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Write strict JSON atomically (non-finite floats as null)."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (a temporary file beside it, then one rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_leftovers(parent: str, pattern: re.Pattern) -> list[str]:
    """Entries of ``parent`` whose names match ``pattern`` (a ``pid`` group) and whose process is gone."""
    if not os.path.isdir(parent):
        return []
    out = []
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        if m and not pid_alive(int(m["pid"])) and not os.path.islink(os.path.join(parent, name)):
            out.append(name)
    return out


def remove_tree_of(root: str, allowed) -> bool:
    """Remove ``root`` only when every file under it satisfies ``allowed(relative path)``, no link is
    in it and every folder can be emptied; returns whether it was removed. Nothing else is touched."""
    if not os.path.isdir(root) or os.path.islink(root):
        return False
    files, dirs, links = _walk(root)
    if links or not all(allowed(f.replace(os.sep, "/")) for f in files):
        return False
    for f in files:
        os.remove(os.path.join(root, f))
    for d in sorted(dirs, key=lambda d: -d.count(os.sep)):
        try:
            os.rmdir(os.path.join(root, d))
        except OSError:
            return False
    try:
        os.rmdir(root)
    except OSError:
        return False
    return True


def remove_listed(root: str) -> None:
    """Remove a directory obslib wrote (``not_ours(root) == []``), file by file: nothing unlisted is deleted."""
    listed = set(read_file_list(root) or {})
    remove_tree_of(root, lambda rel: rel in listed or rel == FILE_LIST)


def rmtree_scratch(path: str) -> None:
    """Remove one of obslib's own temporary directories (named ``.obslib-*``, made by this process with
    ``mkdtemp``): the only place a whole tree is removed without a file list."""
    if not os.path.basename(path).startswith(".obslib-"):
        raise ValueError(f"refusing to remove {path!r}: not an obslib temporary directory")
    shutil.rmtree(path, ignore_errors=True)
