"""Resumable pruning: checkpoint directories that obslib owns, and the package checkpoints of ``prune_model``.

A checkpoint directory (``--checkpoint-dir``, default ``.obslib-ckpt-OUT`` beside ``--out``) is obslib's
only when it holds the marker ``obslib_checkpoint.json`` naming its run (the configuration's fingerprint)
and nothing but checkpoint entries: folders named ``pkg-NNNN`` (package checkpoints), ``it-NNNNNNN``
(gradient flow) or ``step-NNNNNNN`` (the trainer), each with exactly one safetensors file and one
``meta.json`` that records the safetensors file's size and SHA-256, and the ``*.tmp-PID`` folders of an
entry being written (each with obslib's scratch marker naming that folder, ``obslib/owned.py``). Anything
else makes it someone else's: it is refused before any work and never deleted. Removal after a successful
run goes entry by entry, each proven first (fingerprint and hash), so a file a user put there keeps the
directory (and itself) in place.

After each package, the layers it changed (their weights and biases, whatever their new shapes) and the
head counts it changed go to ``pkg-NNNN`` (written under a temporary name and renamed, so an entry that
exists is complete), with the report so far and a fingerprint of the configuration. A resumed run checks
every entry before using any (marker, fingerprint, JSON fields and types, tensor names, shapes, dtypes and
finite values against the model), re-applies them in order and continues with the next package;
calibration is a pure function of the model and the configuration, so the result is bit-identical to an
uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import fields

import torch

from . import owned
from .errors import UsageError
from .owned import write_json

MARKER = "obslib_checkpoint.json"
KINDS = {  # kind -> (entry prefix, digits, the files of one entry)
    "packages": ("pkg-", 4, ("weights.safetensors", "meta.json")),
    "gradient-flow": ("it-", 7, ("state.safetensors", "meta.json")),
    "training": ("step-", 7, ("state.safetensors", "meta.json")),  # the embedded model's trainer, per stage
}
DELETE_HINT = "delete that directory, or run without --resume"


class CheckpointDir:
    """One checkpoint directory: checked before any work, written entry by entry, removed file by file."""

    def __init__(self, path: str, kind: str, flag: str = "--checkpoint-dir", fingerprint: dict | None = None):
        self.given = os.fspath(path)
        self.fp = None if fingerprint is None else json.loads(json.dumps(fingerprint))
        self.path, self.kind, self.flag = os.path.abspath(self.given), kind, flag
        self.prefix, digits, self.files = KINDS[kind]
        self._entry = re.compile(rf"^{re.escape(self.prefix)}\d{{{digits}}}$")
        self._tmp = re.compile(rf"^{re.escape(self.prefix)}\d{{{digits}}}\.tmp-\d+$")

    # ------------------------------------------------------------------ checks (before any work)
    def check_place(self, protect=(), out: str | None = None) -> None:
        """Refuse a path that could lose a user's files by where it is: a file, a link, the model (or inside it,
        or holding it), ``--out`` (or inside it, or holding it), a folder whose parent is missing."""
        p, flag, shown = self.path, self.flag, self.given
        if os.path.islink(p):
            raise UsageError(f"{flag} {shown!r} is a symbolic link; give a real path")
        for d in protect:
            how = d and os.path.exists(d) and owned.overlap(p, d)
            if how == "is":
                raise UsageError(f"{flag} {shown!r} is the model directory; choose a new directory outside it")
            if how == "inside":
                raise UsageError(f"{flag} {shown!r} lies inside the model directory {d!r}; choose a directory outside it")
            if how == "contains":
                raise UsageError(f"{flag} {shown!r} contains the model directory {d!r}; choose a new directory")
        if out:
            real_out = os.path.realpath(out)
            real = os.path.realpath(p)
            if real == real_out or owned.inside(real, real_out):
                raise UsageError(f"{flag} {shown!r} is --out or lies inside it; checkpoints go beside the output, "
                                 "not in it")
            if owned.inside(real_out, real):
                raise UsageError(f"{flag} {shown!r} contains --out {out!r}; choose a separate directory")
        if os.path.lexists(p) and not os.path.isdir(p):
            raise UsageError(f"{flag} {shown!r} is an existing file; give a directory path that does not exist yet")
        parent = os.path.dirname(p)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {shown!r}: its parent directory {parent!r} does not exist")

    def check(self, protect=(), out: str | None = None) -> None:
        """``check_place``, then refuse a folder whose parent is not writable, or an existing folder that is not
        an obslib checkpoint of this kind (or of another run)."""
        self.check_place(protect, out)
        p, flag, shown = self.path, self.flag, self.given
        parent = os.path.dirname(p)
        if os.path.isdir(p):
            problem = self._not_ours()
            if problem is None and self.fp is not None:
                theirs = self._marker().get("fingerprint") or {}
                k = fp_differs(self.fp, theirs)
                if k is not None:
                    raise UsageError(f"the checkpoint in {self.path!r} belongs to a different configuration ({k} "
                                     f"{theirs.get(k)!r} there, {self.fp[k]!r} here; see its {MARKER}); rerun with the "
                                     "same settings or delete that directory")
            if problem:
                raise UsageError(f"{flag} {shown!r} is an existing directory that is not an obslib checkpoint ({problem}); "
                                 "give a path that does not exist yet (obslib creates it)")
        try:  # permission bits do not bind root, and a file system may be read-only: try it
            target = p if os.path.isdir(p) else parent
            os.rmdir(tempfile.mkdtemp(prefix=f".obslib-probe-{os.getpid()}-", dir=target))
        except OSError as e:
            raise UsageError(f"{flag} {shown!r}: cannot write in {target!r} ({e.strerror or e})") from None

    def _marker(self) -> dict:
        with open(os.path.join(self.path, MARKER), encoding="utf-8") as f:
            return json.load(f)

    def _not_ours(self) -> str | None:
        """Why the existing directory is not an obslib checkpoint of this kind, or None when it is."""
        marker = os.path.join(self.path, MARKER)
        if not os.path.isfile(marker) or os.path.islink(marker):
            return f"no {MARKER}" if os.listdir(self.path) else "it is empty but obslib did not create it"
        try:
            meta = self._marker()
        except owned.JSON_ERRORS:
            return f"its {MARKER} is not valid JSON"
        if not isinstance(meta, dict) or meta.get("written_by") != owned.WRITTEN_BY \
                or not isinstance(meta.get("kind"), str) or meta["kind"] not in KINDS:
            return f"its {MARKER} is not obslib's"
        if meta["kind"] != self.kind:
            return f"it holds {meta['kind']} checkpoints; this method writes {self.kind} checkpoints"
        if "fingerprint" not in meta or not isinstance(meta["fingerprint"], (dict, type(None))):
            return f"its {MARKER} names no run (an older obslib's checkpoint; delete it to start over)"
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if name == MARKER:
                continue
            if name.startswith(".obslib-probe-") and os.path.isdir(full) and not os.path.islink(full) \
                    and not os.listdir(full):
                continue  # another process's write probe (empty, removed at once)
            if os.path.islink(full) or not os.path.isdir(full) or not (self._entry.match(name) or self._tmp.match(name)):
                return f"it holds {name!r}"
            allowed = self.files if self._entry.match(name) else (*self.files, owned.SCRATCH)
            for f in os.listdir(full):
                if f not in allowed or os.path.islink(os.path.join(full, f)) \
                        or not os.path.isfile(os.path.join(full, f)):
                    return f"it holds {os.path.join(name, f)!r}"
            # an entry cut short while written that obslib cannot prove (a kill before its marker) is never read:
            # it does not make the directory someone else's, and removal leaves it in place with a note
        return None

    def _entry_problem(self, full: str) -> str | None:
        """Why one entry (complete, or a temporary one being written) cannot be proven this run's, or None.
        Proof: its meta.json names the marker's run and the safetensors file's size and SHA-256, or (an entry
        cut short while written) obslib's scratch marker naming the folder and nothing but entry files."""
        if os.path.basename(full) and self._tmp.match(os.path.basename(full)) \
                and owned.scratch_problem(full, purposes=("checkpoint-entry",),
                                          allowed=lambda rel: rel in self.files) is None:
            return None
        mf, tf = os.path.join(full, "meta.json"), os.path.join(full, self.files[0])
        try:
            with open(mf, encoding="utf-8") as f:
                meta = json.load(f)
            theirs = self._marker().get("fingerprint")
        except (*owned.JSON_ERRORS, AttributeError):
            return "its meta.json is missing or unreadable"
        rec = meta.get("files", {}).get(self.files[0]) if isinstance(meta, dict) and isinstance(meta.get("files"),
                                                                                             dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
            return f"its meta.json records no SHA-256 of {self.files[0]} (an older obslib's, or not obslib's)"
        if theirs is not None and meta.get("fingerprint") != theirs:
            return "its meta.json names another run than the directory's marker"
        if not os.path.isfile(tf) or os.path.getsize(tf) != rec.get("bytes") or owned.sha256_file(tf) != rec["sha256"]:
            return f"its {self.files[0]} is not the file its meta.json records"
        return None

    # ------------------------------------------------------------------ entries
    def entries(self) -> list[str]:
        """Complete entries, oldest first."""
        if not os.path.isdir(self.path):
            return []
        return sorted(d for d in os.listdir(self.path)
                      if self._entry.match(d) and all(os.path.isfile(os.path.join(self.path, d, f)) for f in self.files))

    def entry_name(self, index: int) -> str:
        digits = KINDS[self.kind][1]
        return f"{self.prefix}{index:0{digits}d}"

    def write(self, index: int, tensors: dict, meta: dict) -> str:
        """Write one entry atomically (temporary name, then rename); creates the directory and its marker.
        A full disk is one line naming the entry and the space it needs; nothing half-written is left."""
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + 2**16
        final = os.path.join(self.path, self.entry_name(index))
        tmp = f"{final}.tmp-{os.getpid()}"
        try:
            self._write(final, tmp, tensors, meta)
        except BaseException as e:  # Ctrl-C and SIGTERM too: no half-written entry stays
            if os.path.isdir(tmp):
                self._remove_entry(tmp)
            if isinstance(e, Exception) and owned.is_disk_full(e):
                raise owned.disk_full(final, need) from None
            raise
        return final

    def _write(self, final: str, tmp: str, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save_file

        if not os.path.isdir(self.path):
            os.makedirs(self.path)
            write_json(os.path.join(self.path, MARKER), {"written_by": owned.WRITTEN_BY, "kind": self.kind,
                                                         "fingerprint": self.fp})
        if os.path.isdir(tmp):
            self._remove_entry(tmp)
        os.makedirs(tmp)
        owned.mark_scratch(tmp, "checkpoint-entry")
        tf = os.path.join(tmp, self.files[0])
        save_file(tensors, tf)
        rec = {"bytes": os.path.getsize(tf), "sha256": owned.sha256_file(tf)}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "files": {self.files[0]: rec}}, f)
        owned.unmark_scratch(tmp)
        os.replace(tmp, final)

    def read(self, name: str, expect_fields: dict) -> tuple[dict, dict]:
        """(tensors, meta) of one entry; anything unreadable or missing is one line naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        mf = os.path.join(self.path, name, "meta.json")
        meta = owned.read_json(mf, f"checkpoint file {mf!r}", DELETE_HINT)
        for key, check in expect_fields.items():
            if key not in meta or not check(meta[key]):
                raise UsageError(f"checkpoint file {mf!r}: field {key!r} is missing or malformed; {DELETE_HINT}")
        tf = os.path.join(self.path, name, self.files[0])
        try:
            tensors = load_file(tf)
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise UsageError(f"checkpoint file {tf!r} is unreadable ({' '.join(str(e).split())[:80]}); "
                             f"{DELETE_HINT}") from None
        for k, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UsageError(f"checkpoint file {tf!r}: tensor {k!r} holds NaN or infinite values; {DELETE_HINT}")
        return tensors, meta

    def keep_only(self, name: str) -> None:
        """Remove every entry but ``name`` (gradient flow keeps its newest checkpoint only)."""
        for d in os.listdir(self.path):
            if (self._entry.match(d) or self._tmp.match(d)) and d != name:
                self._remove_entry(os.path.join(self.path, d))

    def _remove_entry(self, full: str) -> bool:
        """Remove one entry proven this run's (``_entry_problem``); else leave it, with one note."""
        why = self._entry_problem(full)
        if why is None and owned.remove_tree_of(full, lambda rel: rel in (*self.files, owned.SCRATCH)):
            return True
        print(f"obslib: note: left {full!r} in place: {why or 'it holds files obslib did not write'}", file=sys.stderr)
        return False

    def remove(self) -> bool:
        """Remove the directory after a successful run: only obslib's files, only if it is still ours."""
        if not os.path.isdir(self.path):
            return False
        problem = self._not_ours()
        if problem:
            print(f"obslib: note: left the checkpoint directory {self.path!r} in place: {problem}", file=sys.stderr)
            return False
        for d in os.listdir(self.path):
            full = os.path.join(self.path, d)
            if (d.startswith(".obslib-probe-") or self._tmp.match(d)) and owned.remove_empty_leftover(full):
                continue  # a write probe, or an entry killed before its marker: empty
            if d != MARKER:
                self._remove_entry(full)
        if sorted(os.listdir(self.path)) == [MARKER]:
            os.remove(os.path.join(self.path, MARKER))
            os.rmdir(self.path)
            return True
        return False

    def remove_if_empty(self) -> None:
        """After a failure before any entry was written: the directory (marker only) goes."""
        if os.path.isdir(self.path) and not self.entries() and not self._not_ours():
            self.remove()


# ---------------------------------------------------------------------- package checkpoints
def fingerprint(cfg, units, steps: int) -> dict:
    d = config_fingerprint(cfg)
    d["steps_used"] = steps
    d["units"] = [[u.kind, *u.hessian_layers] for u in units]
    return json.loads(json.dumps(d))


def config_fingerprint(cfg) -> dict:
    """The part of the fingerprint known before the model is loaded."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("fingerprint")}
    d["prompts_sha256"] = hashlib.sha256("\n".join(cfg.prompts or []).encode()).hexdigest()
    d["seeding"] = cfg.seeding  # a checkpoint calibrated with another noise seeding is another run
    return json.loads(json.dumps(d))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


PACKAGE_FIELDS = {
    "fingerprint": lambda v: isinstance(v, dict),
    "package": _is_int,
    "heads": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(h) for k, h in v.items()),
    "state": lambda v: isinstance(v, dict) and _is_int(v.get("next")) and isinstance(v.get("layers"), list)
    and isinstance(v.get("package_mb"), list) and _is_num(v.get("calibration_s")) and _is_num(v.get("solve_s")),
}


def fp_differs(ours: dict, theirs: dict) -> str | None:
    """The first field of fingerprint ``ours`` that ``theirs`` lacks or holds another value of, or None."""
    ours = json.loads(json.dumps(ours))
    for k in ours:
        if not isinstance(theirs, dict) or k not in theirs or theirs[k] != ours[k]:
            return k
    return None


class PackageCheckpoint:
    def __init__(self, path: str, fp: dict):
        self.dir = CheckpointDir(path, "packages", fingerprint=fp)
        self.path, self.fp = self.dir.path, fp

    def saved(self) -> list[str]:
        return self.dir.entries()

    def check_config(self, resume: bool, command: str | None = None) -> None:
        """Before the model is loaded: a checkpoint without ``resume`` is refused (with the command that
        continues it), and one of another configuration is refused either way."""
        entries = self.saved()
        if not entries:
            return
        _, meta = self.dir.read(entries[-1], PACKAGE_FIELDS)
        mf = os.path.join(self.path, entries[-1], "meta.json")
        theirs = meta["fingerprint"]
        diff = [k for k in self.fp if k in theirs and theirs[k] != self.fp[k]]
        diff += [k for k in self.fp if k not in theirs]
        if diff:
            k = diff[0]
            raise UsageError(f"the checkpoint in {self.path!r} belongs to a different configuration ({k} "
                             f"{theirs.get(k)!r} there, {self.fp[k]!r} here; see {mf!r}); rerun with the same "
                             "settings or delete that directory")
        if not resume:
            cont = f"continue it: {command} --resume" if command else "pass --resume (resume=True) to continue it"
            raise UsageError(f"{self.dir.given!r} holds the checkpoint of an interrupted run of these settings "
                             f"({len(entries)} package(s) done); {cont}; or delete that directory to start over")

    def load(self, den, expected: list[tuple[list[str], list[str]]], resume: bool) -> list[tuple]:
        """Read and check every saved entry against the model before any is applied. ``expected[i]`` are
        package i's (layer names, attention modules). Returns [(tensors, heads, state)] in order."""
        self.check_config(resume)
        out = []
        for i, e in enumerate(self.saved()):
            tensors, meta = self.dir.read(e, PACKAGE_FIELDS)
            tf = os.path.join(self.path, e, self.dir.files[0])
            mf = os.path.join(self.path, e, "meta.json")
            if meta["fingerprint"] != self.fp:
                raise UsageError(f"the checkpoint in {self.path!r} belongs to a different configuration or model "
                                 f"(see {mf!r}); rerun with the same settings or delete that directory")
            if e != self.dir.entry_name(i) or meta["package"] != i or meta["state"]["next"] != i + 1 \
                    or i >= len(expected):
                raise UsageError(f"checkpoint {os.path.join(self.path, e)!r} is out of sequence (expected "
                                 f"{self.dir.entry_name(i)}); {DELETE_HINT}")
            layers, attns = expected[i]
            _check_layers(den, tensors, layers, tf)
            if set(meta["heads"]) - set(attns):
                raise UsageError(f"checkpoint file {mf!r} sets head counts of modules outside its package; "
                                 f"{DELETE_HINT}")
            for name, h in meta["heads"].items():
                now = den.get_submodule(name).heads
                if not 1 <= h <= now:
                    raise UsageError(f"checkpoint file {mf!r}: {name} has {h} heads; allowed 1 to {now}; "
                                     f"{DELETE_HINT}")
            out.append((tensors, meta["heads"], meta["state"]))
        return out

    def restore(self, den, undo, loaded: list[tuple]) -> dict | None:
        """Re-apply the checked entries (see ``load``); returns the saved state of the last one, or None."""
        state = None
        for i, (tensors, heads, st) in enumerate(loaded):
            try:
                _apply_entry(den, tensors, heads, undo)
            except (RuntimeError, ValueError, IndexError) as e:
                raise UsageError(f"checkpoint {os.path.join(self.path, self.dir.entry_name(i))!r} does not fit the "
                                 f"model ({' '.join(str(e).split())[:100]}); {DELETE_HINT}") from None
            state = st
        return state

    def save(self, index: int, den, names: list[str], heads: dict[str, int], state: dict) -> None:
        tensors = {}
        for n in names:
            m = den.get_submodule(n)
            tensors[f"{n}.weight"] = m.weight.detach().contiguous().cpu()
            if getattr(m, "bias", None) is not None:
                tensors[f"{n}.bias"] = m.bias.detach().contiguous().cpu()
        self.dir.write(index, tensors, {"fingerprint": self.fp, "package": index, "heads": heads, "state": state})


def _check_layers(den, tensors: dict, layers: list[str], tf: str) -> None:
    """Tensor names, shapes and dtypes of one package entry against the (not yet pruned) model."""
    want = set()
    for name in layers:
        m = den.get_submodule(name)
        want.add(f"{name}.weight")
        if getattr(m, "bias", None) is not None:
            want.add(f"{name}.bias")
    if set(tensors) != want:
        odd = sorted(set(tensors) ^ want)[0]
        raise UsageError(f"checkpoint file {tf!r} does not hold this package's layers (e.g. {odd!r}); {DELETE_HINT}")
    for name in layers:
        m = den.get_submodule(name)
        w = tensors[f"{name}.weight"]
        cur = tuple(m.weight.shape)
        ok = w.dim() == 2 and all(0 < a <= b for a, b in zip(w.shape, cur)) and (w.shape[0] == cur[0]
                                                                                 or w.shape[1] == cur[1])
        if not ok or w.dtype != m.weight.dtype:
            raise UsageError(f"checkpoint file {tf!r}: {name}.weight is {w.dtype} {tuple(w.shape)}, the model's "
                             f"layer is {m.weight.dtype} {cur} (a different model or --dtype?); {DELETE_HINT}")
        b = tensors.get(f"{name}.bias")
        if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != m.bias.dtype):
            raise UsageError(f"checkpoint file {tf!r}: {name}.bias is {b.dtype} {tuple(b.shape)}, its weight has "
                             f"{w.shape[0]} rows and the model's bias is {m.bias.dtype} (a different model or "
                             f"--dtype?); {DELETE_HINT}")


def _apply_entry(den, tensors: dict, heads: dict, undo) -> None:
    from .surgery import linear_like, replace_module, set_heads

    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        w, b = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
        m = den.get_submodule(name)
        with torch.no_grad():
            if tuple(m.weight.shape) == tuple(w.shape):
                undo.weight(name)
                m.weight.copy_(w.to(m.weight.device))
                if b is not None:
                    m.bias.copy_(b.to(m.bias.device))
            else:  # a structurally pruned layer: a smaller module takes its place
                undo.module(name)
                replace_module(den, name, linear_like(m, w.to(m.weight.device), None if b is None else b.to(m.weight.device)))
    for name, h in heads.items():
        attn = den.get_submodule(name)
        undo.attrs(attn, ("heads", "inner_dim", "inner_kv_dim"))
        set_heads(attn, int(h))


# ---------------------------------------------------------------- optimiser state in a checkpoint
def optim_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """An optimiser's state as safetensors-ready tensors (``prefix.<param>.<name>``) and its JSON-ready groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def optim_restore(opt: torch.optim.Optimizer, tensors: dict, groups: dict, prefix: str) -> None:
    """Load what ``optim_tensors`` wrote back into ``opt``."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})
