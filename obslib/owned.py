"""What obslib may delete: only what it can prove it wrote, checked file by file.

Every directory obslib writes as an output carries ``obslib_files.json``: the list of every file it wrote
in it, at every depth, with its size and SHA-256. A directory may be replaced (``--overwrite``) only when
what is in it now is exactly that list: a file a user added at any depth, a file edited since (whatever its
size), a symbolic link or an extra folder makes it someone else's. A file list is checked before it is used
(JSON of the right shape, keys relative and inside the directory, no ``..``, at most ``MAX_LISTED`` entries).

Scratch directories (the temporary half of an atomic write, the old half of a swap, the propagate record's
spill directory, a checkpoint entry being written) carry ``.obslib-scratch.json``: the PID of the process
that made the directory and the directory's own device and inode number, so a folder a user named like
one, or copied from one, is not mistaken for it. A leftover of a killed run is removed (or moved back)
only when its name and marker agree on a PID that is no longer alive, its marker names this very
directory, and its contents are what the marker and file list allow; anything else is left alone.

Two runs on one path: ``RunLock`` is a lock file beside the path (``.obslib-lock-NAME``, created
atomically with its owner's PID, ``flock``-ed while held), so the second run is refused in one line.

What a forged file list (or marker) can still do: it is JSON anyone can write. A list crafted to name a
file of the user's with that file's exact size and SHA-256 makes obslib treat the file as its own, and
``--overwrite`` then deletes it. Nothing can be reached outside the directory the list is in.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time

FILE_LIST = "obslib_files.json"
SCRATCH = ".obslib-scratch.json"
WRITTEN_BY = "obslib"
MAX_LISTED = 100_000  # entries of a file list obslib reads (a real pipeline has well under 100)
MAX_LIST_BYTES = 64 * 2**20
JSON_ERRORS = (OSError, ValueError, RecursionError, TypeError)  # what reading a crafted JSON file can raise
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
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


def _key(rel: str) -> str:
    return rel.replace(os.sep, "/")


def describe(root: str, skip=(FILE_LIST, SCRATCH)) -> dict:
    """The file list of ``root`` as it is now (what ``write_file_list`` records): size and SHA-256 of every file."""
    files, _, _ = _walk(root)
    out = {}
    for rel in files:
        if rel in skip:
            continue
        full = os.path.join(root, rel)
        out[_key(rel)] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    return out


def write_file_list(root: str) -> None:
    """Record every file under ``root`` (call it last, when the directory is complete)."""
    write_json(os.path.join(root, FILE_LIST), {"written_by": WRITTEN_BY, "files": describe(root)})


def _bad_key(k) -> bool:
    if not isinstance(k, str) or not k or len(k) > 4096 or "\x00" in k or "\\" in k:
        return True
    parts = k.split("/")
    return k.startswith("/") or any(p in ("", ".", "..") for p in parts) or k in (FILE_LIST, SCRATCH)


def file_list_problem(root: str) -> tuple[dict | None, str | None]:
    """(the checked file list of ``root``, None) or (None, why it cannot be used). A list is used only when it
    is obslib's JSON, bounded, and every key is a relative path inside ``root`` with a size and a SHA-256."""
    f = os.path.join(root, FILE_LIST)
    if not os.path.lexists(f):
        return None, f"it has no {FILE_LIST} list of the files obslib wrote"
    if os.path.islink(f) or not os.path.isfile(f):
        return None, f"its {FILE_LIST} is not a regular file"
    if os.path.getsize(f) > MAX_LIST_BYTES:
        return None, f"its {FILE_LIST} is larger than {MAX_LIST_BYTES // 2**20} MiB"
    try:
        with open(f, encoding="utf-8") as fh:
            obj = json.load(fh)
    except JSON_ERRORS:
        return None, f"its {FILE_LIST} is not valid JSON"
    files = obj.get("files") if isinstance(obj, dict) and obj.get("written_by") == WRITTEN_BY else None
    if not isinstance(files, dict):
        return None, f"its {FILE_LIST} is not obslib's"
    if len(files) > MAX_LISTED:
        return None, f"its {FILE_LIST} names {len(files)} files; at most {MAX_LISTED} are allowed"
    for k, v in files.items():
        if _bad_key(k):
            return None, f"its {FILE_LIST} names {str(k)[:80]!r}, which is not a relative path inside it"
        if not (isinstance(v, dict) and isinstance(v.get("bytes"), int) and not isinstance(v.get("bytes"), bool)
                and v["bytes"] >= 0 and (v.get("sha256") is None or (isinstance(v["sha256"], str)
                                                                    and _HEX64.match(v["sha256"])))):
            return None, f"its {FILE_LIST} entry for {k[:80]!r} is malformed"
    return files, None


def read_file_list(root: str) -> dict | None:
    return file_list_problem(root)[0]


def is_listed_unchanged(root: str, rel: str) -> bool:
    """``rel`` (a file obslib wrote in ``root``) is on its file list and unchanged since (size and SHA-256)."""
    entry = (read_file_list(root) or {}).get(rel)
    full = os.path.join(root, rel)
    if entry is None or os.path.islink(full) or not os.path.isfile(full) or not entry.get("sha256"):
        return False
    return os.path.getsize(full) == entry["bytes"] and sha256_file(full) == entry["sha256"]


def replace_listed_text(root: str, rel: str, text: str) -> None:
    """Rewrite a text file obslib wrote in ``root`` (check ``is_listed_unchanged`` first) and its entry of the file
    list; the rest of the list is kept as it is. Each write is atomic; a crash between the two leaves the file
    unlisted-as-changed, so the directory counts as someone else's (the safe side)."""
    full = os.path.join(root, rel)
    write_text(full, text)
    f = os.path.join(root, FILE_LIST)
    with open(f, encoding="utf-8") as fh:
        obj = json.load(fh)
    obj["files"][rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    write_json(f, obj)


def not_ours(root: str, skip=()) -> list[str] | None:
    """What under ``root`` obslib did not write: [] when every file at every depth is on its (checked) file
    list, unchanged in size and SHA-256; None when the directory has no usable file list. ``skip``: top-level
    names left out of the comparison (a scratch marker checked separately)."""
    listed = read_file_list(root)
    if listed is None:
        return None
    files, dirs, links = _walk(root)
    bad = list(links)
    for rel in files:
        key = _key(rel)
        if rel == FILE_LIST or rel in skip:
            continue
        entry = listed.get(key)
        full = os.path.join(root, rel)
        if entry is None:
            bad.append(rel)
            continue
        if entry.get("sha256") is None:
            bad.append(f"{rel} (listed without a SHA-256 by an older obslib: cannot be checked)")
        elif os.path.getsize(full) != entry["bytes"] or sha256_file(full) != entry["sha256"]:
            bad.append(f"{rel} (changed)")
    needed = {os.path.dirname(k) for k in listed}
    needed |= {p for k in needed for p in _parents(k)}
    extra_dirs = [d for d in dirs if _key(d) not in needed]
    shown = [b.split(" (")[0] for b in bad]  # a foreign folder is named only when nothing in it is already named
    bad += [d for d in extra_dirs if not any(inside(os.path.join("/", x), os.path.join("/", d)) for x in shown)
            and not any(inside(os.path.join("/", e), os.path.join("/", d)) for e in extra_dirs)]
    return sorted(bad)


def _parents(rel: str):
    while rel and rel != os.path.dirname(rel):
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


def read_json(path: str, what: str, hint: str = "", dict_only: bool = True):
    """The JSON in ``path`` — one place for "read a JSON file or say, in one line, why not": an unreadable file or
    invalid JSON (and, with ``dict_only``, anything but an object) is a ``UsageError`` naming ``what`` (e.g.
    "checkpoint file 'ck/p0/meta.json'"), the reason, and ``hint`` (what to do)."""
    from .errors import UsageError

    tail = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except JSON_ERRORS as e:
        raise UsageError(f"{what} is unreadable ({' '.join(str(e).split())[:120]}){tail}") from None
    if dict_only and not isinstance(obj, dict):
        raise UsageError(f"{what} does not hold a JSON object{tail}")
    return obj


def write_json(path: str, obj) -> None:
    """Write strict JSON atomically (non-finite floats as null)."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (a temporary file beside it, then one rename); a full disk is one line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_disk_full(e):
            raise disk_full(path, len(text.encode("utf-8"))) from None
        raise


# ---------------------------------------------------------------------------------------- a full disk
def is_disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC/EDQUOT, or a library's error that wraps one (safetensors: 'No space left')."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full(path: str, need_bytes: int | None = None):
    """The one-line error for a full disk at ``path`` (a ``UsageError``)."""
    from .errors import UsageError

    try:
        free = human(shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free)
    except OSError:
        free = "unknown"
    need = f"{human(need_bytes)} needed, " if need_bytes else ""
    return UsageError(f"no space left on the device while writing {path!r} ({need}{free} free); free some space "
                      "and run again")


# ---------------------------------------------------------------------------------------- processes
def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` since boot (clock ticks), with this boot's id: with the PID it names one
    process for good (a PID reused later, or the same PID in a restarted container, has another). None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{f.read().strip()}:{start}"
    except (OSError, IndexError):
        return None


def process_identity() -> dict:
    """What obslib records of the process that makes a marker or a lock."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _proc_start(os.getpid())}


def process_gone(info: dict) -> bool | None:
    """Whether the process a marker or lock names has ended: True, False, or None when this machine cannot tell
    (it ran on another host)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return True
    host = info.get("host")
    if isinstance(host, str) and host != socket.gethostname():
        return None
    started = info.get("started")
    if pid == os.getpid():  # this process, or an earlier one that had the same PID (a restarted container)
        return isinstance(started, str) and started != _proc_start(pid)
    if not pid_alive(pid):
        return True
    now = _proc_start(pid)
    return isinstance(started, str) and now is not None and now != started  # the PID was reused


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31
    return True


def dead_leftovers(parent: str, pattern: re.Pattern) -> list[str]:
    """Entries of ``parent`` whose names match ``pattern`` (a ``pid`` group) and whose process is gone: by its
    marker where it has one (PID, host and start time), else by the PID in the name. Another host's are kept."""
    if not os.path.isdir(parent):
        return []
    out = []
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        full = os.path.join(parent, name)
        if not m or os.path.islink(full) or not os.path.isdir(full):
            continue
        marker = scratch_marker(full)
        if marker is not None and marker["pid"] == int(m["pid"]):
            gone = process_gone(marker)
        else:
            gone = int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
        if gone is not False:  # None (another host): the caller leaves it alone with a note
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------- scratch dirs
def make_scratch(parent: str, prefix: str, purpose: str) -> str:
    """A new directory ``parent/prefixXXXX`` with its marker (this PID, its own device and inode)."""
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        mark_scratch(d, purpose)
    except BaseException:
        os.rmdir(d)
        raise
    return d


def mark_scratch(d: str, purpose: str) -> None:
    """Write ``d``'s marker (atomically): this process (PID, host, start time) and the folder's inode, which a
    copy of the folder does not share (the device number is not kept: it changes across NFS clients and remounts)."""
    write_json(os.path.join(d, SCRATCH), {"written_by": WRITTEN_BY, "purpose": purpose, **process_identity(),
                                          "ino": os.lstat(d).st_ino})


def unmark_scratch(d: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(d, SCRATCH))


def scratch_marker(d: str) -> dict | None:
    """The marker of ``d`` when it is obslib's and names this very directory (device and inode), else None."""
    f = os.path.join(d, SCRATCH)
    try:
        if os.path.islink(d) or os.path.islink(f) or not os.path.isfile(f) or os.path.getsize(f) > 4096:
            return None
        with open(f, encoding="utf-8") as fh:
            m = json.load(fh)
        st = os.lstat(d)
    except JSON_ERRORS:
        return None
    ok = (isinstance(m, dict) and m.get("written_by") == WRITTEN_BY and isinstance(m.get("purpose"), str)
          and all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) for k in ("pid", "ino"))
          and m["ino"] == st.st_ino)
    return m if ok else None


def scratch_problem(d: str, pid: int | None = None, purposes=None, allowed=None, trusted: bool = False) -> str | None:
    """Why ``d`` cannot be proven one of obslib's scratch directories (None when it can): its marker must name
    this directory, ``pid`` (when given) and one of ``purposes``; with a file list, every file must be on it,
    unchanged; without one, every file must satisfy ``allowed`` (default: none may exist)."""
    m = scratch_marker(d)
    if m is None:
        return f"it has no valid {SCRATCH} marker naming this directory"
    if pid is not None and m["pid"] != pid:
        return f"its marker names process {m['pid']}, its name process {pid}"
    if purposes is not None and m["purpose"] not in purposes:
        return f"its marker is for {m['purpose']!r}"
    if m.get("host") not in (None, socket.gethostname()):
        return f"it was made by a run on host {m['host']!r}, whose processes this machine cannot see"
    files, _, links = _walk(d)
    if links:
        return f"it holds a symbolic link ({links[0]})"
    if trusted:  # this process's own, checked by its caller (e.g. just before a swap): no second hash
        return None
    if os.path.lexists(os.path.join(d, FILE_LIST)):
        bad = not_ours(d, skip=(SCRATCH,))
        if bad is None:
            return file_list_problem(d)[1]
        return f"it holds {bad[0]}" if bad else None
    odd = [f for f in files if f != SCRATCH and not (allowed and allowed(_key(f)))]
    return f"it holds {odd[0]}, which obslib does not write there" if odd else None


def remove_scratch(d: str, **checks) -> str | None:
    """Remove a scratch directory proven obslib's (``scratch_problem``), file by file, its file list and then its
    marker last (so a removal cut short is still proven the same way). Returns None when removed, else why it was
    left alone. A file that disappears meanwhile (another rank cleaning the same leftover) is not an error."""
    try:
        problem = scratch_problem(d, **checks)
        if problem:
            return problem
        files, dirs, _ = _walk(d)
        for f in sorted(files, key=lambda f: (f in (FILE_LIST, SCRATCH), f == SCRATCH)):
            if f != SCRATCH:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(d, f))
        for sub in sorted(dirs, key=lambda x: -x.count(os.sep)):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(d, sub))
        if sorted(os.listdir(d)) != [SCRATCH]:
            return "it could not be emptied"  # still marked: the next run proves it the same way
        unmark_scratch(d)
        os.rmdir(d)
    except FileNotFoundError:
        return None if not os.path.lexists(d) else "it changed while obslib removed it"
    except OSError as e:
        return f"it could not be emptied ({e.strerror or e})"
    return None


def remove_empty_leftover(d: str) -> bool:
    """A leftover folder with nothing in it at all (a kill before its marker was written): removing it loses nothing."""
    try:
        if not os.path.islink(d) and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
            return True
    except OSError:
        pass
    return False


def remove_tree_of(root: str, allowed) -> bool:
    """Remove ``root`` only when every file under it satisfies ``allowed(relative path)``, no link is
    in it and every folder can be emptied; returns whether it was removed. Nothing else is touched."""
    if not os.path.isdir(root) or os.path.islink(root):
        return False
    files, dirs, links = _walk(root)
    if links or not all(allowed(_key(f)) for f in files):
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
    remove_tree_of(root, lambda rel: rel in listed or rel in (FILE_LIST, SCRATCH))


# ---------------------------------------------------------------------------------------- one run per path
LOCK_PREFIX = ".obslib-lock-"


class RunLock:
    """Exclusive use of ``path`` by one obslib process, for as long as the ``with`` block runs.

    The lock is the file ``.obslib-lock-NAME`` beside ``path``. It is made complete before anyone can see it (a
    temporary file holding its owner's PID and host, ``flock``-ed, then hard-linked into place), and stays
    ``flock``-ed while held: the kernel releases that when the owner dies, however it dies. So a second run that
    cannot take the ``flock`` is refused in one line, and one that can has found a dead run's lock, which it
    removes (only when it is an obslib lock: a file of that name obslib did not write is never touched).
    Re-entrant within one process. Where the file system has no ``flock`` or no hard links, the lock falls
    back to the PID (and start time) it records."""

    _held: dict[str, list] = {}

    def __init__(self, path, flag: str = "--out"):
        ok = isinstance(path, (str, os.PathLike)) and str(path).strip()
        self.real = os.path.realpath(os.fspath(path)) if ok else None  # a bad path: the path checks name it
        self.flag, self.shown = flag, os.fspath(path) if ok else path
        self.file = self.real and os.path.join(os.path.dirname(self.real), LOCK_PREFIX + os.path.basename(self.real))

    def _refuse(self, why: str):
        from .errors import UsageError

        return UsageError(f"{self.flag} {self.shown!r}: {why}")

    def _read(self) -> dict | None:
        try:
            if os.path.islink(self.file) or not os.path.isfile(self.file) or os.path.getsize(self.file) > 4096:
                return None
            with open(self.file, encoding="utf-8") as f:
                d = json.load(f)
        except JSON_ERRORS:
            return None
        ok = isinstance(d, dict) and d.get("written_by") == WRITTEN_BY and d.get("kind") == "lock" \
            and isinstance(d.get("pid"), int) and not isinstance(d.get("pid"), bool)
        return d if ok else None

    def _create(self, parent: str):
        """Try to put a complete, flock-ed lock file in place: its fd, or None when one exists already."""
        tmp = os.path.join(parent, f"{LOCK_PREFIX}{os.getpid()}-{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            os.write(fd, json.dumps({"written_by": WRITTEN_BY, "kind": "lock", **process_identity(),
                                     "path": self.real}).encode())
            try:
                os.link(tmp, self.file)
            except FileExistsError:
                os.close(fd)
                return None
            except OSError as e:  # no hard links here: an exclusive create (a reader may see it empty, briefly)
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    raise
                os.close(fd)
                try:
                    fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return None
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, json.dumps({"written_by": WRITTEN_BY, "kind": "lock", **process_identity(),
                                         "path": self.real}).encode())
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def __enter__(self):
        if self.real is None:
            return self
        held = RunLock._held.get(self.real)
        if held is not None:
            held[1] += 1
            return self
        parent = os.path.dirname(self.real)
        if not os.path.isdir(parent):
            return self  # nothing can be written there; the path checks say so in their own words
        for _ in range(50):
            try:
                fd = self._create(parent)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full(self.file, 4096) from None
                return self  # a read-only parent: the write checks refuse it in their own words
            if fd is not None:
                RunLock._held[self.real] = [fd, 1]
                return self
            try:  # someone's lock is there: alive (flock held, or a live PID) or a dead run's
                try:
                    other = os.open(self.file, os.O_RDWR)  # NFSv4 takes an exclusive flock on a writable fd only
                except PermissionError:
                    other = os.open(self.file, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its owner just removed it: try again
            except OSError as e:
                raise self._refuse(f"cannot open the lock {self.file!r} ({e.strerror or e})") from None
            info = self._read()
            if info is None and other is not None and os.fstat(other).st_size == 0:
                os.close(other)
                time.sleep(0.05)  # (no hard links) an exclusive create about to be written
                continue
            if info is None:
                os.close(other)
                raise self._refuse(f"{self.file!r} is in the way and obslib did not write it (obslib keeps its lock "
                                   "for a path there); move it away")
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                gone = True
            except BlockingIOError:
                gone = False
            except OSError:  # no flock on this file system: the PID and start time it records decide
                gone = process_gone(info) is True
            if not gone:
                os.close(other)
                where = "" if info.get("host") in (None, socket.gethostname()) else f" on host {info['host']!r}"
                raise self._refuse(f"another obslib run (process {info['pid']}{where}) is using it; wait for that run "
                                   f"to finish, or choose another {self.flag} (its lock: {self.file!r})")
            with contextlib.suppress(OSError):  # a dead run's lock: removed only if the file is still that one
                if os.stat(self.file).st_ino == os.fstat(other).st_ino:
                    os.remove(self.file)
            os.close(other)
        raise self._refuse(f"could not take the lock {self.file!r}")

    def __exit__(self, *exc):
        if self.real is None:
            return False
        held = RunLock._held.get(self.real)
        if held is None:
            return False
        held[1] -= 1
        if held[1] == 0:
            fd = held[0]
            with contextlib.suppress(OSError):
                if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
                    os.remove(self.file)
            os.close(fd)
            del RunLock._held[self.real]
        return False
