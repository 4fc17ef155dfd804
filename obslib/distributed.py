"""Multi-process calibration and solving on torch.distributed.

When a process group is initialised (``torchrun --nproc-per-node N -m obslib prune ...``, or a user's own
``init_process_group`` before ``obslib.prune``), every rank holds the whole model and:

1. checks that all ranks run the same model and settings (a digest of the configuration, the prompts
   and every weight, all-gathered; a mismatch is a ``UsageError`` on every rank);
2. samples only its share of the calibration prompts (prompt i goes to rank i mod N, with prompt i's own
   noise seed, ``obslib.sampling.prompt_seed``), so the union is exactly the single-process calibration and
   any number of processes up to the number of prompts works;
3. all-reduces each package's Hessian sums (float32) and token weights, so every rank holds the same H;
4. solves its share of the package's layers (unstructured and N:M: layers are independent given H,
   dealt out greedily by cost d_out * d_in^2) and broadcasts each solution from its owner. Structured
   units change shapes and are solved on every rank from the same H (no communication).

Only rank 0 writes outputs and checkpoints. The bytes each rank sends per package are in the report.
The sums are reduced in a different order than one process adds them, so the Hessians agree to float32
rounding; the masks agree except on exact near-ties.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist

from .errors import UsageError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the process group: nccl on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def rank_device(device: str) -> str:
    """torchrun with CUDA: each rank on its own GPU (cuda -> cuda:LOCAL_RANK)."""
    if str(device) == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class Context:
    """The process group as the pruning driver sees it, counting the bytes this rank sends."""

    def __init__(self):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        self.sent = 0

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.cuda() if self.backend == "nccl" and not t.is_cuda else t

    def check_agreement(self, what: dict, den) -> None:
        """Every rank must prune the same model with the same settings."""
        h = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, p in sorted(den.state_dict().items()):
                h.update(name.encode())
                h.update(repr((tuple(p.shape), float(p.double().sum()), float(p.double().abs().sum()))).encode())
        mine = self._dev(torch.tensor(list(h.digest()), dtype=torch.int64))
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        self.sent += mine.numel() * 8 * (self.size - 1)
        bad = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if bad:
            e = UsageError(f"torchrun ranks disagree on the model or settings (rank {bad[0]} differs from rank 0); "
                           "every rank must get the same command line and model")
            e.same_on_every_rank = True  # the command line prints it on rank 0 only
            raise e

    def shard(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.size))

    def allreduce_stats(self, stats: dict) -> None:
        """Sum every layer's statistics over the ranks, in place (an accumulator shared by layers once)."""
        seen = set()
        for name in sorted(stats):
            st = stats[name]
            if id(st) in seen:
                continue
            seen.add(id(st))
            for t in (st.xtx, st.xsum):
                buf = self._dev(t)
                dist.all_reduce(buf)
                if buf is not t:
                    t.copy_(buf)
                self.sent += t.numel() * t.element_size()
            steps = sorted(st.step_energy)  # every rank samples every step (each has at least one batch)
            scal = torch.tensor([st.weight, float(st.tokens)] + [v for s in steps for v in st.step_energy.get(s, [0.0, 0])],
                                dtype=torch.float64)
            scal = self._dev(scal)
            dist.all_reduce(scal)
            self.sent += scal.numel() * 8
            scal = scal.cpu().tolist()
            st.weight, st.tokens = scal[0], int(round(scal[1]))
            st.step_energy = {s: [scal[2 + 2 * i], int(round(scal[3 + 2 * i]))] for i, s in enumerate(steps)}

    def any_failed(self, failed: bool) -> bool:
        flag = self._dev(torch.tensor([1 if failed else 0], dtype=torch.int64))
        dist.all_reduce(flag)
        self.sent += 8
        return bool(flag.item())

    def assign(self, costs: list[float]) -> list[int]:
        """Owner rank of each job: greedy longest-first onto the least-loaded rank (deterministic)."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        buf = self._dev(t.contiguous())
        dist.broadcast(buf, src)
        if self.rank == src:
            self.sent += buf.numel() * buf.element_size() * (self.size - 1)
        return buf.to(t.device)

