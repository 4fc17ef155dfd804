"""I/O: atomic pipeline directories (safetensors + JSON only), JSON reports, and loading.

A pruned pipeline is written with diffusers' own ``save_pretrained`` into a temporary sibling directory
that is renamed into place only when complete, so a failed run never leaves a half-written output.
Structurally pruned transformers change shapes; they carry ``obslib_manifest.json`` listing the new
per-layer shapes and head counts, which ``load_pruned`` uses to rebuild the modules before loading.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile

import torch

from . import owned
from .errors import UsageError
from .owned import write_json  # noqa: F401  (obslib.io.write_json, as before)

MANIFEST = "obslib_manifest.json"


DEFAULTS_FILE = "obslib_defaults.json"  # a model's own sampling defaults and calibration set


def read_defaults(model_dir) -> dict | None:
    """The model's ``obslib_defaults.json`` as a dict, or None when it has none; unreadable is one line."""
    f = os.path.join(os.fspath(model_dir), DEFAULTS_FILE)
    if not os.path.exists(f):
        return None
    return owned.read_json(f, repr(f))


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' warnings while sampling: the embedded model's placeholder T5 tokenizer makes the
    pipeline warn that captions are "truncated" to max_sequence_length on every call (its output is all zeros
    by design, so nothing is lost)."""
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------------
# Output directories: never lose a user's files.
#
# An output directory is written into a temporary sibling ``.obslib-tmp-<name>-<pid>-<random>`` (marked as
# obslib's scratch: ``obslib/owned.py``) that replaces the destination only when complete. Replacing an existing
# destination is one atomic ``renameat2(RENAME_EXCHANGE)`` where the file system supports it (the old contents
# land in the temporary name, are marked and removed file by file); elsewhere it is two renames through
# ``.obslib-old-<name>-<pid>-...``, and a run killed between them is repaired by the next run to the same
# destination. A leftover is removed or moved back only when its marker, its file list and its contents prove
# it obslib's and its process is gone; anything else beside ``--out`` is left alone, with one note.

WRITTEN_BY = "obslib"
_SCRATCH = re.compile(r"^\.obslib-(tmp|old)-(?P<base>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
# what diffusers' save_pretrained (and obslib's JSON writes) put in an output being written
SAVE_KINDS = (".json", ".safetensors", ".txt", ".model", ".md", ".tmp")


def written_by_obslib(path: str) -> bool:
    """True when every file under ``path``, at every depth, is one obslib wrote there and has not changed
    since (its ``obslib_files.json`` file list; see ``obslib/owned.py``)."""
    return owned.not_ours(path) == []


def say_note(text: str) -> None:
    print(f"obslib: note: {text}", file=sys.stderr)


def clean_stale(out: str, note=say_note) -> list[str]:
    """Remove the temporary directories a killed run left beside ``out``; put back an ``out`` that a kill
    between the two renames of a replacement left missing. Only what is proven obslib's is touched; each
    leftover that is not gets one ``note``. Returns what was removed or restored."""
    out = os.path.abspath(out)
    parent, base = os.path.dirname(out), os.path.basename(out)
    if not os.path.isdir(parent):
        return []
    done = []
    mark = owned.scratch_marker(out) if os.path.isdir(out) and not os.path.islink(out) else None
    if mark is not None and owned.process_gone(mark) is True:
        owned.unmark_scratch(out)  # a run killed inside its swap: the output in place stays as it is
    for name in owned.dead_leftovers(parent, _SCRATCH):
        m = _SCRATCH.match(name)
        if m["base"] != base:
            continue
        path, pid = os.path.join(parent, name), int(m["pid"])
        if owned.remove_empty_leftover(path):  # killed before its marker: nothing in it
            done.append(f"removed {name}")
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            why = owned.scratch_problem(path, pid=pid, purposes=("old",))
            if why is None and owned.not_ours(path, skip=(owned.SCRATCH,)) != []:
                why = "it has no complete obslib file list"
            if why is None:
                owned.unmark_scratch(path)
                os.replace(path, out)  # the replacement never completed: the old output is the last good one
                done.append(f"restored {out} from {name}")
                continue
        else:
            why = owned.remove_scratch(path, pid=pid, purposes=("tmp", "old"),
                                       allowed=lambda rel: rel.endswith(SAVE_KINDS))
            if why is None:
                done.append(f"removed {name}")
                continue
        if note is not None:
            note(f"left {path!r} alone: it is named like a leftover of an obslib run, but {why}")
    return done


def tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def check_output_dir(out, protect=(), overwrite: bool = False, need_bytes: int = 0, flag: str = "--out",
                     note=say_note, clean: bool = True, verify_existing: bool = True) -> str:
    """Refuse an output directory that could lose a user's files, before any work is done.

    ``protect`` are directories that must survive (the model being pruned): ``out`` may be none of them, lie
    inside one, or contain one. An existing ``out`` must be an empty directory, or (with ``overwrite``) a
    directory that obslib wrote. Its parent must exist and be writable, with room for ``need_bytes``.
    Stale temporary directories of a killed earlier run to the same destination are cleaned up (``clean``;
    under torchrun rank 0 alone does it). ``verify_existing=False`` leaves the hashing of an existing output to
    the check just before the swap. Returns the absolute destination.
    """
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise UsageError(f"{flag} {out!r}: expected a directory path")
    out = os.fspath(out)
    base = os.path.basename(os.path.normpath(out))
    if len(os.fsencode(base)) > 200:
        raise UsageError(f"{flag}: the directory name is {len(os.fsencode(base))} bytes long; at most 200 are allowed")
    if os.path.islink(out):
        raise UsageError(f"{flag} {out!r} is a symbolic link; give the real directory path")
    real = os.path.realpath(out)
    for p in protect:
        if p is None:
            continue
        pr = os.path.realpath(p)
        if real == pr:
            raise UsageError(f"{flag} {out!r} is the model directory itself; choose a new directory")
        if owned.inside(real, pr):
            raise UsageError(f"{flag} {out!r} lies inside the model directory {p!r}; choose a directory outside it")
        if owned.inside(pr, real):
            raise UsageError(f"{flag} {out!r} contains the model directory {p!r} (replacing it would delete the model); "
                             "choose a new directory")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {out!r}: its parent directory {parent!r} does not exist")
    if clean:
        clean_stale(real, note)
    if os.path.lexists(real):
        if not os.path.isdir(real):
            raise UsageError(f"{flag} {out!r} is an existing file; choose a new directory name")
        if os.listdir(real):
            if not overwrite:
                raise UsageError(f"{flag} {out!r} exists and is not empty; choose a new directory, or pass --overwrite "
                                 "to replace an earlier obslib output")
            extra = owned.not_ours(real) if verify_existing else []
            if extra is None:
                why = owned.file_list_problem(real)[1]
                raise UsageError(f"{flag} {out!r} was not written by obslib ({why}); refusing to replace it, even "
                                 "with --overwrite")
            if extra and all("by an older obslib" in x for x in extra):
                raise UsageError(f"{flag} {out!r} was written by an older obslib, which recorded no SHA-256 for its "
                                 f"large files ({extra[0].split(' (')[0]}), so it cannot be checked; delete it yourself "
                                 "or choose a new directory")
            if extra:
                more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
                raise UsageError(f"{flag} {out!r} holds files obslib did not write ({', '.join(extra[:3])}{more}); "
                                 "refusing to replace it, even with --overwrite")
    try:  # permission bits do not bind root, and a file system may be read-only: try it (with the real name length)
        os.rmdir(tempfile.mkdtemp(prefix=f".obslib-tmp-{os.path.basename(real)}-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise UsageError(f"{flag} {out!r}: cannot write in {parent!r} ({e.strerror or e})") from None
    if need_bytes:
        free = shutil.disk_usage(parent).free
        need = int(need_bytes * 1.05) + 16 * 2**20
        if free < need:
            raise UsageError(f"{flag} {out!r}: {parent!r} has {owned.human(free)} free; the output needs about {owned.human(need)}")
    return real


def check_output_file(out: str, protect=(), flag: str = "--out") -> None:
    """--out is a new file, or an earlier obslib metrics file, in an existing writable directory: never a
    directory, a symbolic link, a file inside a model directory or anyone else's file."""
    if not out or not out.strip():
        raise UsageError(f"{flag} '': expected a JSON file path")
    if out.endswith(os.sep) or os.path.isdir(out):
        raise UsageError(f"{flag} {out!r} is a directory; expected a JSON file path")
    if os.path.islink(out):
        raise UsageError(f"{flag} {out!r} is a symbolic link; give the real file path")
    real = os.path.realpath(out)
    parent, base = os.path.dirname(real), os.path.basename(real)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {out!r}: directory {parent!r} does not exist")
    if len(os.fsencode(base)) > 200:
        raise UsageError(f"{flag}: the file name is {len(os.fsencode(base))} bytes long; at most 200 are allowed")
    for p in protect:
        if p and os.path.commonpath([real, os.path.realpath(p)]) == os.path.realpath(p):
            raise UsageError(f"{flag} {out!r} lies inside the model directory {p!r}; write the metrics elsewhere")
    if os.path.lexists(out):
        try:
            with open(out, encoding="utf-8") as f:
                old = json.load(f)
            ok = isinstance(old, dict) and old.get("written_by") == WRITTEN_BY  # obslib's own marker, never key names
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"{flag} {out!r} exists and is not an obslib metrics file (no \"written_by\": \"obslib\" "
                             "in it); refusing to replace it")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{base}.{os.getpid()}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {out!r}: cannot write in {parent!r} ({e.strerror or e})") from None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False


def _rename2(a: str, b: str, flags: int) -> int:
    """renameat2(a, b, flags): 0 on success, else errno (ENOSYS/EINVAL where unsupported)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return 38  # ENOSYS
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return 0 if fn(-100, os.fsencode(a), -100, os.fsencode(b), flags) == 0 else ctypes.get_errno()


COMPLETED: set[str] = set()  # outputs this process swapped into place (an interrupt right after is told apart)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait (are delivered right after) while the swap renames run: no half-done swap. The
    handlers only record the signal meanwhile (a signal mask would not do: with other threads running, the kernel
    hands the signal to one of them and Python still runs the handler in the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got, prev = [], {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            prev[s] = signal.signal(s, lambda n, f: got.append(n))
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in dict.fromkeys(got):
            signal.raise_signal(s)  # now, to the handler the process had


def _finish(out: str, tmp: str, overwrite: bool) -> None:
    """Move the complete ``tmp`` to ``out``, re-checking ``out`` at this moment (another run may have
    written it since the check before the work). Every folder that a kill could leave beside ``out`` carries a
    valid marker at every moment: the marker of the old output is written into ``out`` before the swap and
    travels with its inode."""
    import errno

    umask = os.umask(0)
    os.umask(umask)
    mode = (os.stat(out).st_mode & 0o7777) if os.path.isdir(out) else (0o777 & ~umask)
    os.chmod(tmp, mode)  # mkdtemp makes 0700; the output gets the usual permissions (or the replaced dir's)
    replacing = os.path.lexists(out)
    if replacing and os.listdir(out) and not (overwrite and written_by_obslib(out)):
        raise UsageError(f"--out {out!r} was written by another process while this one worked; nothing was "
                         "replaced (this run's result is discarded)")
    # the new output keeps its "tmp" marker through the rename (the marker names its inode) and loses it only once
    # it is in place: a kill at any moment leaves marked folders, and a marker left in --out is removed next time
    old = None
    with _signals_held():
        if not replacing:
            rc = _rename2(tmp, out, 1)  # RENAME_NOREPLACE: never replaces what appeared meanwhile
            if rc in (errno.ENOSYS, errno.EINVAL):
                os.replace(tmp, out)  # a file system without renameat2: replaces an empty directory at most
            elif rc != 0:
                if rc == errno.EEXIST:
                    raise UsageError(f"--out {out!r} was created by another process while this one worked; "
                                     "nothing was replaced (this run's result is discarded)")
                raise OSError(rc, os.strerror(rc), out)
            owned.unmark_scratch(out)
            COMPLETED.add(out)
            return
        owned.mark_scratch(out, "old")  # travels with the old output's inode, wherever the swap puts it
        try:
            if _exchange(tmp, out):
                old = tmp  # now holds the old contents (checked above: every file obslib's)
            else:
                parent, base = os.path.dirname(out), os.path.basename(out)
                old = tempfile.mkdtemp(prefix=f".obslib-old-{base}-{os.getpid()}-", dir=parent)
                os.rmdir(old)
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
        except BaseException:
            owned.unmark_scratch(out)  # the old output stays as it was
            raise
        owned.unmark_scratch(out)
        COMPLETED.add(out)
    _drop_old(old)


def _drop_old(path: str) -> None:
    """Remove the replaced output (every file on its list, checked just before the swap, so not hashed again)."""
    why = owned.remove_scratch(path, pid=os.getpid(), purposes=("old",), trusted=True)
    if why:
        say_note(f"left the replaced output {path!r} in place: {why}")


def atomic_dir(out: str, overwrite: bool = False):
    """Context manager yielding a temporary directory that replaces ``out`` on success (see above).

    The caller checks ``out`` first (``check_output_dir``); on failure or interruption the temporary
    directory is removed and ``out`` is untouched."""

    class _Atomic:
        def __enter__(self):
            self.out = os.path.realpath(out)
            parent, base = os.path.dirname(self.out), os.path.basename(self.out)
            clean_stale(self.out, note=None)  # the check before the work has named what it leaves alone
            self.tmp = owned.make_scratch(parent, f".obslib-tmp-{base}-{os.getpid()}-", "tmp")
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                self._drop()
                return False
            out, tmp = self.out, self.tmp
            try:
                _finish(out, tmp, overwrite)
            except BaseException:
                self._drop()
                raise
            return False

        def _drop(self):
            if not os.path.isdir(self.tmp):
                return
            if owned.scratch_marker(self.tmp) is None:  # never expected: the marker stays until the swap
                try:
                    owned.mark_scratch(self.tmp, "tmp")
                except (OSError, UsageError):
                    pass
            why = owned.remove_scratch(self.tmp, pid=os.getpid(), trusted=True)  # this run's own
            if why:
                say_note(f"left {self.tmp!r} in place: {why}")

    return _Atomic()


def pipeline_bytes(pipe) -> int:
    """Bytes of every tensor of the pipeline's modules (what ``save_pretrained`` will write, roughly)."""
    total = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in comp.state_dict().values())
    return total


def save_pipeline(pipe, out: str, manifest: dict | None = None, extra_json: dict[str, object] | None = None,
                  protect=(), overwrite: bool = False, flag: str = "out", extra_text: dict[str, str] | None = None,
                  notes: bool = True) -> None:
    """Save a pipeline with safetensors; optional structured-pruning manifest and extra JSON files.

    ``out`` is checked first (``check_output_dir``): the pipeline's own source directory and ``protect``
    survive, an existing non-obslib directory is never replaced, and the write is atomic. ``notes``: say what
    is left alone beside ``out`` (the command line has said it before the work)."""
    source = getattr(pipe, "name_or_path", None)
    protect = [p for p in (source, *protect) if p and os.path.isdir(p)]
    need = pipeline_bytes(pipe)
    with owned.RunLock(out, flag):
        check_output_dir(out, protect, overwrite, need_bytes=need, flag=flag, note=say_note if notes else None)
        try:
            _write_pipeline(pipe, out, overwrite, manifest, extra_json, extra_text)
        except Exception as e:  # an OSError, or safetensors' own error type wrapping one
            if owned.is_disk_full(e):
                raise owned.disk_full(out, need) from None
            raise


def _write_pipeline(pipe, out, overwrite, manifest, extra_json, extra_text) -> None:
    with atomic_dir(out, overwrite) as tmp, quiet_loading():  # no "Writing model shards" bars
        pipe.save_pretrained(tmp, safe_serialization=True)
        if manifest is not None:
            write_json(os.path.join(tmp, MANIFEST), manifest)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)
        for name, text in (extra_text or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        owned.write_file_list(tmp)  # last: what --overwrite may later replace, file by file


def save_pruned(pipe, report: dict, out: str, model_dir: str | None = None, overwrite: bool = False,
                flag: str = "out", notes: bool = True) -> None:
    """Write the pruned pipeline, its report and (when shapes changed) its manifest atomically.

    The same rules as the command line: ``out`` may not be, contain or lie inside the model directory
    (``model_dir``, default the directory the pipeline was loaded from); an existing non-empty ``out`` is
    replaced only with ``overwrite=True`` and only if obslib wrote it. The model's ``obslib_defaults.json``
    (sampling defaults) is carried over, and a model card (``README.md``, ``obslib.card``) is written."""
    if not isinstance(report, dict) or "method" not in report:
        raise UsageError("report must be the dict returned by obslib.prune")
    if not hasattr(pipe, "save_pretrained") or not hasattr(pipe, "components"):
        raise UsageError(f"pipe must be a diffusers pipeline, got {type(pipe).__name__}")
    if model_dir is not None and not isinstance(model_dir, (str, os.PathLike)):
        raise UsageError(f"model_dir={model_dir!r}: expected a directory path or None")
    if not isinstance(overwrite, bool):
        raise UsageError(f"overwrite={overwrite!r}: expected True or False")
    source = os.fspath(model_dir) if model_dir is not None else getattr(pipe, "name_or_path", None)
    extra = {"pruning_report.json": {"written_by": WRITTEN_BY, "obslib_version": _version(),
                                     **{k: v for k, v in report.items() if k != "manifest"}}}
    carried = read_defaults(source) if source and os.path.isdir(source) else None
    if carried is not None:
        extra[DEFAULTS_FILE] = carried
    from .card import CARD, card_text

    name = os.path.basename(os.path.normpath(os.fspath(out))) if isinstance(out, (str, os.PathLike)) else "pruned"
    card = card_text(extra["pruning_report.json"], source, name)
    save_pipeline(pipe, out, manifest=report.get("manifest"), extra_json=extra, extra_text={CARD: card},
                  protect=[source] if source else [], overwrite=overwrite, flag=flag, notes=notes)


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------
# Loading: local directories only, safetensors only; anything broken is bad input, not a crash.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_pipeline_dir(path) -> dict:
    """Cheap structural check of a pipeline directory before anything is imported or loaded; returns its
    ``model_index.json``. Refuses a missing directory, a malformed index, missing component folders and
    components whose weights exist only in a pickle format."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"model directory {path!r}: expected a path")
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"model directory {path!r} is a file, not a directory; give a diffusers pipeline directory")
    if not os.path.isdir(path):
        raise UsageError(f"model directory {path!r} does not exist")
    f = os.path.join(path, "model_index.json")
    if not os.path.isfile(f):
        raise UsageError(f"{path!r} is not a diffusers pipeline directory (no model_index.json)")
    index = owned.read_json(f, f"{path!r}: model_index.json", dict_only=False)
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise UsageError(f"{path!r}: model_index.json does not name a pipeline class")
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and v[0] is not None}
    if not parts:
        raise UsageError(f"{path!r}: model_index.json lists no components")
    missing = sorted(k for k, v in parts.items() if v[0] in ("diffusers", "transformers")
                     and not os.path.isdir(os.path.join(path, k)))
    if missing:
        raise UsageError(f"{path!r} is not a complete pipeline: missing component folder(s) {', '.join(missing)}")
    for k in parts:
        d = os.path.join(path, k)
        if not os.path.isdir(d):
            continue
        files = os.listdir(d)
        pickled = sorted(x for x in files if x.endswith(PICKLE_SUFFIXES))
        if pickled and not any(x.endswith(".safetensors") for x in files):
            raise UsageError(f"{os.path.join(path, k)!r} holds pickle-format weights ({pickled[0]}); obslib loads "
                             "safetensors only (convert with save_pretrained(..., safe_serialization=True))")
    return index


def ignored_pickles(path) -> list[str]:
    """Pickle-format weight files beside safetensors in a pipeline's component folders: obslib never loads
    them (the command line says so)."""
    out = []
    for k in sorted(os.listdir(path)):
        d = os.path.join(path, k)
        if os.path.isdir(d) and not os.path.islink(d):
            files = os.listdir(d)
            if any(x.endswith(".safetensors") for x in files):
                out += [os.path.join(k, x) for x in sorted(files) if x.endswith(PICKLE_SUFFIXES)]
    return out


def check_finite_weights(pipe, path) -> None:
    """A damaged weights file (bytes changed in its data section) loads without complaint: refuse NaN or
    infinite weights in any component, naming it, before they turn into NaN Hessians."""
    for name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        for pname, p in comp.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise UsageError(f"{os.path.join(os.fspath(path), name)!r}: {bad} of the {p.numel()} weights of "
                                 f"{pname} are NaN or infinite (a damaged weights file, or values too large for this dtype)")


def check_device(device) -> str:
    """A device string torch knows and that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"device {device!r}: expected a string such as 'cpu' or 'cuda:0'")
    try:
        d = torch.device(device)
        if d.type not in ("cpu", "cuda", "mps", "xpu") or (d.type == "cpu" and d.index not in (None, 0)):
            raise RuntimeError(f"{d.type}{'' if d.index is None else ':' + str(d.index)} cannot run a pipeline")
        torch.empty(0, device=d)
    except Exception as e:  # unknown name, or a backend that is absent here
        msg = " ".join(str(e).split())[:160]
        raise UsageError(f"device {str(device)!r} is not usable here ({msg}); allowed: cpu"
                         + (", cuda[:N]" if torch.cuda.is_available() else "")) from None
    return str(device)


@contextlib.contextmanager
def quiet_loading(enabled: bool = True):
    """Keep diffusers' and transformers' loading bars and warnings off stderr."""
    if not enabled:
        yield
        return
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    state = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in (dlog, tlog)]
    for m, _, _ in state:
        m.disable_progress_bar()
        m.set_verbosity(50)  # CRITICAL: a failed load is reported by obslib in one line, not by the library too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, bar, verbosity in state:
            if bar:
                m.enable_progress_bar()
            m.set_verbosity(verbosity)


def _from_pretrained(path, progress: bool = False, **kw):
    from diffusers import DiffusionPipeline

    try:
        with quiet_loading(not progress):
            return DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True, **kw)
    except (UsageError, MemoryError):
        raise
    except Exception as e:  # a broken or foreign directory is bad input, not a crash
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"could not load a pipeline from {path!r}: {msg[:300]}") from None


def load_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = False):
    """Load any pipeline directory offline (safetensors only); structured-pruned ones are rebuilt from their
    manifest. Anything broken raises ``UsageError`` naming the directory. ``progress`` shows the loading bars."""
    check_pipeline_dir(path)
    check_device(device)
    if os.path.exists(os.path.join(path, MANIFEST)):
        pipe = load_pruned(path, device=device, dtype=dtype, progress=progress)
    else:
        pipe = _ready(_from_pretrained(path, progress, dtype=dtype), device)
    check_finite_weights(pipe, path)
    return pipe


def _ready(pipe, device):
    pipe.to(device)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pruned(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = False):
    """Load a structurally pruned pipeline written by ``obslib prune --pattern structured``."""
    check_pipeline_dir(path)
    check_device(device)
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        denoiser = manifest["component"]
        with quiet_loading(not progress):
            model = load_pruned_model(os.path.join(path, denoiser), _component_class(path, denoiser), manifest, dtype)
    except (UsageError, MemoryError):
        raise
    except Exception as e:  # truncated weights, a manifest that does not fit, an unknown class
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"could not load the pruned model in {path!r}: {msg[:300]}") from None
    return _ready(_from_pretrained(path, progress, dtype=dtype, **{denoiser: model}), device)


def load_pruned_model(model_dir: str, cls, manifest: dict, dtype: torch.dtype = torch.float32):
    """Build ``cls`` from the config in ``model_dir``, resize it to the manifest, then load its weights."""
    from safetensors.torch import load_file

    from .manifest import apply_manifest

    model = cls.from_config(cls.load_config(model_dir))
    apply_manifest(model, manifest)
    state = {}
    for fn in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        state.update(load_file(os.path.join(model_dir, fn)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: pruned weights do not match the manifest "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype).eval()


def _component_class(path: str, name: str):
    import diffusers

    with open(os.path.join(path, "model_index.json")) as f:
        library, clsname = json.load(f)[name]
    return getattr(diffusers, clsname)
