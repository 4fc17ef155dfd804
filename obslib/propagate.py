"""Propagated calibration: dense sampling once, then each package is calibrated on its own blocks only.

``--calibration resample`` (the paper's way) re-runs full sampling for every package, so calibration
cost grows with K. ``--calibration propagate`` samples once with the dense model and *records* what
enters the first block of the first package at every step of every calibration run (every keyword the
block takes: both streams, the timestep embedding, rotary embeddings ...). From then on a package is
calibrated by replaying that record through its own blocks only; the blocks it passes on the way are
the pruned ones, so each package sees the outputs of the packages before it, as SparseGPT propagates
through pruned layers. What differs from resample is only the *trajectory*: the latents of every step
come from the dense model rather than from the partly pruned one.

    record R at block r  (r = first block of the previous package; blocks < r are final)
    package p over blocks b0..b1:  replay R through blocks r..b1 with hooks on p's layers,
                                   capturing the input of b0 on the way (the next record),
                                   stopping as soon as the last of p's layers in b1 has run
    solve p; R, r := captured record, b0

Within the replayed blocks, a sub-module whose layers are all solved (none is in this or a later package)
is *settled*: its output is kept per record entry (``ModuleMemo``) and handed back on a later replay when
its inputs are bitwise equal, so one package per basic unit does not recompute a block's finished part
(attention, a finished feed-forward) for every unit after it. The memo lives in RAM next to the record,
within the same limit; what does not fit is recomputed. And a replay does not compute what its Hessians
cannot read: layers of later packages (a unit never reads a later unit's output) and, for a package of
one basic unit, its own layers (no layer of a unit reads another's) return zeros after their inputs are
taken. Results are bitwise identical with or without either.

The first package is calibrated during the dense sampling itself, so K = 1 costs exactly what resample's
K = 1 costs and gives the same Hessians. How a block's output becomes the next block's input is the
architecture table's ``chain`` (blocks that do not run one after another, as in a UNet, have none and
cannot propagate). The record's size is printed before it grows; above the RAM limit it is spilled to
disk as one safetensors file per step, read back memory-mapped.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import owned
from .hessian import Calibration
from .errors import UsageError


class _Stop(Exception):
    """Raised by a hook to end a block call once every layer that matters has run."""


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class BlockRecord:
    """The keyword inputs of one block at every step of every calibration run, in run order.

    Tensors are kept on the CPU (a GPU run moves each entry back when it is replayed). When the projected
    size (the first entry's size times the number of entries expected) passes ``ram_limit`` bytes, every
    entry's tensors go to ``spill_dir`` as one safetensors file instead, loaded back memory-mapped when
    replayed. Non-tensor inputs (None, flags, empty dicts) stay in RAM."""

    def __init__(self, block: int, expected: int, ram_limit: int, spill_dir: str | None, say=print):
        self.block, self.expected, self.ram_limit, self.spill_dir, self.say = block, expected, ram_limit, spill_dir, say
        self.entries: list[tuple[int, int, dict, dict | str]] = []  # (run, step, non-tensors, tensors or file)
        self.on_disk: bool | None = None
        self.device = torch.device("cpu")

    def add(self, run: int, step: int, kwargs: dict) -> None:
        flat, rest = {}, {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                flat[k] = v
            elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
                flat.update({f"{k}.{i}": x for i, x in enumerate(v)})  # Flux's rotary (cos, sin) pair
                rest[k] = _Seq(len(v))
            else:
                rest[k] = v
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in flat.items()}
        self.device = next((v.device for v in flat.values()), torch.device("cpu"))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.on_disk is None:
            projected = size * self.expected
            self.on_disk = projected > self.ram_limit
            where = (f"spilled to {self.spill_dir} (over the {self.ram_limit / 2**20:.0f} MiB RAM limit)"
                     if self.on_disk else "kept in RAM")
            self.say(f"propagate: the record of block {self.block}'s inputs needs {projected / 2**20:.1f} MiB "
                     f"({self.expected} steps x {size / 2**20:.2f} MiB); {where}")
            if self.on_disk:
                os.makedirs(self.spill_dir, exist_ok=True)
        if self.on_disk:
            path = os.path.join(self.spill_dir, f"b{self.block:04d}-{len(self.entries):06d}.safetensors")
            try:
                save_file(tensors, path)
            except Exception as e:  # a full disk is one line naming the path and the space the record needs
                with contextlib.suppress(OSError):
                    os.remove(path)
                if owned.is_disk_full(e):
                    raise owned.disk_full(path, size * (self.expected - len(self.entries))) from None
                raise
            self.entries.append((run, step, rest, path))
        else:
            self.entries.append((run, step, rest, tensors))

    def __iter__(self):
        for run, step, rest, t in self.entries:
            t = load_file(t) if isinstance(t, str) else t  # safetensors maps the file
            t = {k: v.to(self.device) for k, v in t.items()}
            kw = {k: (tuple(t.pop(f"{k}.{i}") for i in range(v.n)) if isinstance(v, _Seq) else v) for k, v in rest.items()}
            yield run, step, {**kw, **t}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ram_bytes(self) -> int:
        """What the entries kept in RAM hold (0 once spilled to disk)."""
        return sum(v.numel() * v.element_size() for *_, t in self.entries if isinstance(t, dict) for v in t.values())

    def drop(self) -> None:
        for *_, t in self.entries:
            if isinstance(t, str) and os.path.exists(t):
                os.remove(t)
        self.entries.clear()


class ModuleMemo:
    """Outputs of settled sub-modules of the replayed blocks, one per (module, record entry, call).

    ``install(blocks, changing)`` wraps the ``forward`` of every sub-module (of a block, by index) that holds
    a weight layer and none of the ``changing`` layer names (and is in eval mode: its output is then a
    function of its inputs and weights, as in every diffusers block). A wrapped call whose inputs equal the
    kept ones returns the kept output; any other call computes and keeps (inputs, output), unless an
    ancestor is keeping its own (which makes the children's unreachable). Kept tensors are referenced, not
    copied; a kept tensor changed in place since (its version counter moved) is a miss. ``set_entry`` is called per replayed record entry; ``drop_before(b)`` frees the blocks no
    replay reaches again.

    The attention core is no sub-module: ``torch.nn.functional.scaled_dot_product_attention``, which every
    diffusers attention processor calls, is wrapped the same way while installed, per (block, record entry, call)
    (``set_block`` says which block runs). So the replay that prunes a block's output projections computes the
    attention core once, and the next replay, which runs the whole (now settled) attention module, reuses it when
    its queries, keys and values are bitwise those kept.

    Used when the blocks run on the CPU, where it was measured. On a GPU the kept outputs would hold device
    memory and nobody has timed it, so replays there recompute (the stubs still apply)."""

    def __init__(self, limit_bytes: int, say=print):
        self.limit, self.say = limit_bytes, say
        self.store: dict[int, dict[int, dict]] = {}  # block -> entry -> (name, call) -> _Kept
        self.bytes = self.peak = self.hits = self.skipped = 0
        self.attention_hits = 0  # of hits, those of the attention function
        self.entry = 0
        self._calls: dict[str, int] = {}
        self._depth = 0  # > 0 while a wrapped module computes an output it will keep
        self._wrapped: list[tuple[nn.Module, object]] = []
        self._sdpa = None  # the unwrapped attention function while installed
        self.block: int | None = None

    def set_block(self, block: int) -> None:
        self.block = block

    def set_entry(self, entry: int) -> None:
        self.entry = entry
        self._calls.clear()

    def install(self, blocks: dict[int, tuple[str, nn.Module]], changing: set[str]) -> None:
        for b, (bname, block) in blocks.items():
            for qname, m in block.named_modules():
                full = f"{bname}.{qname}"
                if (not qname or not _has_weight_layer(m) or any(x.training for x in m.modules())
                        or any(p == full or p.startswith(full + ".") for p in changing)):
                    continue  # the block itself, nothing to save, dropout live, or changed by a package to come
                _replace_forward(m, self._wrap(b, full, m.forward), self._wrapped)
        if self._sdpa is None:
            self._sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._wrap_attention(self._sdpa)

    def remove(self) -> None:
        _restore_forwards(self._wrapped)
        if self._sdpa is not None:
            F.scaled_dot_product_attention, self._sdpa = self._sdpa, None
        self.block = None

    def _wrap_attention(self, sdpa):
        wrapped = self._wrap(None, "<attention>", sdpa)

        def call(*args, **kwargs):
            if self.block is None:  # not inside a replayed block
                return sdpa(*args, **kwargs)
            return wrapped(*args, **kwargs)
        return call

    def _wrap(self, block: int | None, name: str, forward):
        """``block`` None: the attention function, kept under the block running at the time (``set_block``)."""
        def call(*args, **kwargs):
            b = self.block if block is None else block
            key = name if block is not None else f"{name}{b}"
            k = self._calls[key] = self._calls.get(key, -1) + 1
            kept = self.store.get(b, {}).get(self.entry, {}).get((key, k))
            if kept is not None and kept.matches((args, kwargs)):
                self.hits += 1
                self.attention_hits += block is None
                return kept.output()
            if self._depth:  # an ancestor keeps the whole result
                return forward(*args, **kwargs)
            self._depth += 1
            try:
                out = forward(*args, **kwargs)
            finally:
                self._depth -= 1
            self._keep(b, key, k, (args, kwargs), out)
            return out
        return call

    def _keep(self, b: int, name: str, call: int, inputs, out) -> None:
        if not _storable(out) or any(t.is_inference() for t in _tensors((inputs, out))):
            return  # an object it cannot check, or inference-mode tensors (they keep no version counter)
        kept = self.store.setdefault(b, {}).setdefault(self.entry, {})
        for k in [k for k in kept if k == (name, call) or k[0].startswith(name + ".")]:  # replaced or unreachable
            self.bytes -= kept.pop(k).size
        new = _Kept(inputs, out)
        if self.bytes + new.size > self.limit:
            if not self.skipped:
                self.say(f"propagate: the memo of finished sub-modules reached its {self.limit / 2**20:.0f} MiB "
                         "limit; what does not fit is recomputed")
            self.skipped += 1
            return
        kept[(name, call)] = new
        self.bytes += new.size
        self.peak = max(self.peak, self.bytes)

    def drop_before(self, block: int) -> None:
        for b in [b for b in self.store if b < block]:
            self.bytes -= sum(v.size for kept in self.store.pop(b).values() for v in kept.values())

    def clear(self) -> None:
        self.store.clear()
        self.bytes = 0


class _Kept:
    """One kept call: its inputs and output (tensors with their version counters at the time)."""

    def __init__(self, inputs, out):
        self.inputs, self.out = inputs, out  # references (replays run without autograd, on the CPU)
        self.tensors = list(_tensors((self.inputs, self.out)))
        self.versions = [t._version for t in self.tensors]
        self.size = sum(t.numel() * t.element_size() for t in self.tensors)

    def matches(self, inputs) -> bool:
        return all(t._version == v for t, v in zip(self.tensors, self.versions)) and _same(inputs, self.inputs)

    def output(self):
        return self.out


_MISSING = object()


def _replace_forward(m: nn.Module, forward, undo: list) -> None:
    """Set ``m.forward`` for the length of a replay, remembering what to put back (``_restore_forwards``)."""
    undo.append((m, m.__dict__.get("forward", _MISSING)))
    m.forward = forward


def _restore_forwards(undo: list) -> None:
    for m, old in reversed(undo):
        if old is _MISSING:
            del m.__dict__["forward"]
        else:
            m.forward = old
    undo.clear()


def _has_weight_layer(m: nn.Module) -> bool:
    return any(isinstance(x, (nn.Linear, nn.Conv1d, nn.Conv2d)) for x in m.modules())


def _same(a, b) -> bool:
    """Bitwise equality of call arguments (tensors, containers of them, plain values); ``b`` is the kept side."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if a is b:
            return True
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return a is b  # anything else must be the very same object


def _storable(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return type(x) in (tuple, list) and all(_storable(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _stub_forward(layer: nn.Linear):
    """A forward that reads its input (hooks still see it) but computes nothing: zeros of the output's shape."""
    def forward(input, *args, **kwargs):
        return input.new_zeros(*input.shape[:-1], layer.out_features)
    return forward


# diffusers' feed-forward input layers: an activation module whose ``proj`` takes the module's input; the output's
# width is proj's divided by this (gated ones split proj's output in two)
_ACTIVATION_WIDTH = {"GELU": 1, "ApproximateGELU": 1, "LinearActivation": 1, "GEGLU": 2, "SwiGLU": 2}


def _stub_activation(module: nn.Module):
    """For an activation module whose ``proj`` is stubbed: call proj (its hooks see the input), skip the activation
    (nothing reads its output either) and return zeros of the output's shape."""
    width = module.proj.out_features // _ACTIVATION_WIDTH[type(module).__name__]

    def forward(hidden_states, *args, **kwargs):
        module.proj(hidden_states)
        return hidden_states.new_zeros(*hidden_states.shape[:-1], width)
    return forward


class _Seq:
    """Stands in the record for a tuple of tensors (stored flat as name.0, name.1, ...)."""

    def __init__(self, n: int):
        self.n = n


def _bind(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A block call's arguments as keywords (positional ones named from the forward signature)."""
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():  # **kwargs of the forward come back nested: flatten them
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


class Propagation:
    """Calibrates packages for ``prune_model`` in propagate mode (see the module docstring).

    ``calibrate(calibration, desc)`` is the same sampling callable resample mode uses; ``blocks`` are the
    denoiser's blocks in execution order and ``chain`` the architecture table's output -> input map."""

    def __init__(self, blocks: list[nn.Module], chain: tuple, calibrate, alphas: list[float], n_runs: int,
                 ram_limit: int | None = None, spill_parent: str | None = None, progress: bool = True, say=None,
                 calib_options: dict | None = None, block_names: list[str] | None = None, memo: bool = True):
        if not chain:
            raise UsageError("--calibration propagate needs a denoiser whose blocks run one after another "
                             "(MMDiT, Flux, DiT/PixArt); this one interleaves other layers (a UNet): use resample")
        self.blocks, self.chain, self.calibrate, self.alphas = blocks, chain, calibrate, list(alphas)
        self.n_runs, self.progress = n_runs, progress
        self.calib_options = dict(calib_options or {})  # Calibration's tokens / token_seed / share_inputs
        self.run_prompts: list[list[int]] = []  # the prompt numbers of each recorded run (token subsets per prompt)
        self.ram_limit = available_ram_bytes() // 2 if ram_limit is None else ram_limit
        _remove_dead_records(spill_parent or tempfile.gettempdir())
        # ours alone (the PID lets a later run remove it if this one is killed); removed by close
        try:
            self.spill_dir = owned.make_scratch(spill_parent or tempfile.gettempdir(), f".obslib-record-{os.getpid()}-",
                                                "propagate-record")
        except OSError as e:
            raise UsageError(f"cannot create the propagate record's spill directory in {spill_parent!r} "
                             f"({e.strerror or e}); give a writable --checkpoint-dir location") from None
        self.say = say or (lambda s: tqdm.write(s) if progress else None)
        self.record: BlockRecord | None = None
        self.block_runs = 0  # block calls made by replays (the cost beyond the one sampling pass)
        self.block_names = block_names
        self.calls_per_step = 1  # denoiser calls per sampling step, learnt from the first (recording) calibration
        self.memo = ModuleMemo(self.ram_limit, self.say) if memo and block_names is not None else None

    def _new_record(self, b: int) -> BlockRecord:
        return BlockRecord(b, self.n_runs * len(self.alphas) * self.calls_per_step, self.ram_limit,
                           os.path.join(self.spill_dir, f"b{b:04d}"), self.say)

    def _capture(self, b: int, rec: BlockRecord, where):
        """A pre-hook on block b appending its inputs to ``rec``; ``where()`` gives (run, step)."""
        block = self.blocks[b]

        def hook(mod, args, kwargs):
            rec.add(*where(), _bind(block, args, kwargs))

        return block.register_forward_pre_hook(hook, with_kwargs=True)

    def first(self, den: nn.Module, b0: int, layers: dict) -> dict:
        """Package 1: dense sampling with its hooks and the capture of block b0's inputs."""
        calib = Calibration(den, layers, self.alphas, **self.calib_options)
        rec = self._new_record(b0)

        def where():
            if rec.on_disk is None:  # the first entry: the sampler has told the calibration its calls per step
                self.calls_per_step = calib.calls_per_step
                rec.expected = self.n_runs * len(self.alphas) * self.calls_per_step
            return calib.run, calib.step - 1

        h = self._capture(b0, rec, where)
        try:
            with calib:
                self.calibrate(calib, "calibrate package 1 (dense sampling, recording)")
        finally:
            h.remove()
        self.record = rec
        self.run_prompts = calib.run_prompts
        return calib.stats

    def package(self, b0: int, b1: int, layers: dict, desc: str = "calibrate package", changing=None,
                not_needed=()) -> dict:
        """Replay the record from its block through b1 with hooks on ``layers`` (all in blocks b0..b1),
        capturing block b0's inputs as the next record when b0 is past the record's block.

        ``changing``: the names of every layer this or a later package changes; given, the sub-modules
        holding none of them are memoized (``ModuleMemo``); without it nothing is. ``not_needed``: linear
        layers whose outputs none of ``layers`` reads; they still see their inputs (and hooks) but compute
        nothing, returning zeros."""
        rec, r = self.record, self.record.block
        if b0 < r:
            raise RuntimeError(f"package starts at block {b0}, before the recorded block {r}")
        calib = Calibration(self.blocks[r], layers, self.alphas, run_prompts=self.run_prompts,
                            calls_per_step=self.calls_per_step, **self.calib_options)
        new = self._new_record(b0) if b0 > r else None
        counter = [0, 0]
        handles = [self._capture(b0, new, lambda: tuple(counter))] if new is not None else []
        last = {n for n, m in layers.items() if _in_block(self.blocks[b1], m)}
        fired: set[str] = set()

        def stop_hook(name):
            def hook(mod, inp, out):
                fired.add(name)
                if fired >= last:
                    raise _Stop
            return hook

        memo = self.memo if changing is not None and rec.device.type == "cpu" else None  # see ModuleMemo
        if memo is not None:
            memo.limit = self.ram_limit - rec.ram_bytes
            memo.install({b: (self.block_names[b], self.blocks[b]) for b in range(r, b1 + 1)},
                         set(changing) | set(layers))
        stubbed: list = []
        for b in range(r, b1 + 1) if not_needed else ():
            for q, m in self.blocks[b].named_modules():
                if isinstance(m, nn.Linear) and f"{self.block_names[b]}.{q}" in not_needed:
                    _replace_forward(m, _stub_forward(m), stubbed)
                elif (type(m).__name__ in _ACTIVATION_WIDTH and isinstance(getattr(m, "proj", None), nn.Linear)
                      and f"{self.block_names[b]}.{q}.proj" in not_needed):
                    _replace_forward(m, _stub_activation(m), stubbed)
        prev_run = None
        try:
            with calib:  # its hooks first: the stop hooks run after the statistics are taken
                handles += [layers[n].register_forward_hook(stop_hook(n)) for n in last]
                for i, (run, step, kw) in enumerate(tqdm(rec, desc=desc, total=len(rec), leave=False,
                                                         disable=not self.progress)):
                    if memo is not None:
                        memo.set_entry(i)
                    if run != prev_run:
                        if prev_run is not None:
                            calib.end_run()
                        calib.begin_run()
                        prev_run = run
                    counter[0], counter[1] = run, step
                    fired.clear()
                    with torch.no_grad():
                        self._forward(r, b1, kw, memo)
                if prev_run is not None:
                    calib.end_run()
        finally:
            for h in handles:
                h.remove()
            if memo is not None:
                memo.remove()
            _restore_forwards(stubbed)
        if new is not None:
            rec.drop()
            self.record = new
            if self.memo is not None:
                self.memo.drop_before(b0)  # no replay starts before b0 again
        return calib.stats

    def _forward(self, r: int, b1: int, kw: dict, memo: ModuleMemo | None = None):
        out = None
        for b in range(r, b1 + 1):
            if b > r:
                kw = self._next_inputs(out, kw)
            self.block_runs += 1
            if memo is not None:
                memo.set_block(b)
            try:
                out = self.blocks[b](**kw)
            except _Stop:
                return None
        return out

    def _next_inputs(self, out, kw: dict) -> dict:
        kw = dict(kw)
        for name, idx in self.chain:
            kw[name] = out if idx is None else out[idx]
        return kw

    def close(self) -> None:
        if self.memo is not None:
            self.memo.clear()
        if self.record is not None:
            self.record.drop()
        owned.remove_scratch(self.spill_dir, pid=os.getpid(), purposes=("propagate-record",), allowed=_recorded)


_RECORD = re.compile(r"^\.obslib-record-(?P<pid>\d+)-\w+$")
_RECORDED = re.compile(r"^b\d{4}/b\d{4}-\d{6}\.safetensors$")


def _recorded(rel: str) -> bool:
    return bool(_RECORDED.match(rel))


def _remove_dead_records(parent: str) -> None:
    """Spill directories that a killed run left in ``parent``: removed only when the name's PID is gone, the
    directory's marker names it and that PID, and it holds nothing but recorded safetensors files."""
    for name in owned.dead_leftovers(parent, _RECORD):
        full = os.path.join(parent, name)
        why = owned.remove_scratch(full, pid=int(_RECORD.match(name)["pid"]), purposes=("propagate-record",),
                                   allowed=_recorded)
        if why:
            print(f"obslib: note: left {full!r} alone: it is named like an obslib propagate record, but {why}",
                  file=sys.stderr)


def _in_block(block: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in block.modules())
