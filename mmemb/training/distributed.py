"""Process-group helpers: rank/world queries, gathers that keep the gradient, env set-up.

Global in-batch negatives need every rank's targets on every rank. A plain ``all_gather``
returns tensors without autograd history, so the loss could not push on the local rows.
:func:`gather_with_grad` gathers, then puts the local tensor itself back in its slot, so
the gradient flows to the local part. Its backward also sums, over ranks, the gradient
each rank's loss puts on *our* rows (an ``all_reduce``): a target is a negative for the
queries of every rank, and without that sum only the local queries' push would reach it.
DeepSpeed then averages parameter gradients over ranks, which makes the update exactly the
gradient of the mean per-rank loss, i.e. of the single-process loss over the global batch.

Example (one process, no group: the identity)::

    >>> import torch
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> gather_with_grad(x).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import errno
import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_env() -> None:
    """Env vars DeepSpeed/torch.distributed read, for a run started without a launcher.

    A launcher (torchrun, ``deepspeed``) sets them; a plain ``python -m`` run gets rank 0
    of 1 on loopback with a free port. Values already set are kept.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def single_node() -> bool:
    """All ranks on this machine, meeting at a loopback MASTER_ADDR (a plain run, or a
    launcher started for one node): then nothing needs to reach the process group's store
    from outside."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    return world == local and os.environ.get("MASTER_ADDR", "127.0.0.1") in LOOPBACK


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise torch.distributed with its TCPStore listening on 127.0.0.1 only.

    ``init_process_group("env://")`` (what ``deepspeed.init_distributed`` does) starts the
    store on rank 0 listening on *every* interface, whatever MASTER_ADDR says; on a shared
    machine anyone on the network could then write into it. In a single-node run rank 0
    binds a loopback socket itself and hands it to the store (``master_listen_fd``); other
    ranks connect to it. Multi-node runs, and torchrun's agent store
    (``TORCHELASTIC_USE_AGENT_STORE``), keep torch's own path. Returns True when it
    initialised the group (a later ``deepspeed.init_distributed()`` reuses it).
    """
    import datetime

    if is_dist() or not single_node() or \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return False
    single_process_env()
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank_ == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            # An earlier group of this process (stage 4 before stage 5) may still hold its
            # store server on this port: torch reuses it (multi-tenant), as env:// would.
            store = dist.TCPStore("127.0.0.1", port, world, True, timeout,
                                  wait_for_workers=False, multi_tenant=True)
        else:
            sock.listen(max(128, world))
            fd = sock.detach()  # the store owns the listening socket from here
            try:
                store = dist.TCPStore("127.0.0.1", port, world, True, timeout,
                                      wait_for_workers=False, multi_tenant=True,
                                      master_listen_fd=fd)
            except BaseException:
                os.close(fd)
                raise
    else:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
    if backend is None:
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world,
                            timeout=timeout)
    return True


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward (local slot = the input itself); all_reduce(SUM)+slice backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [W * B, ...]
        w, r = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.contiguous())
        parts[r] = x  # the local rows are exactly ours (no round-trip through the wire)
        ctx.rank, ctx.n = r, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # [W * B, ...] -> [B, ...]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss pushes on our rows
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order: [B, ...] -> [W * B, ...].

    The local slice ``[rank * B:(rank + 1) * B]`` is ``x`` itself, so gradients reach it.
    Every rank must pass the same ``B`` (the sampler guarantees it). Identity without a
    process group or with one rank.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """all_gather without autograd (ids, keys, counts): [B, ...] -> [W * B, ...]."""
    if not is_dist() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(values: dict[str, float], mean: bool = False) -> dict[str, float]:
    """Sum (or mean) of scalar metrics over ranks, one collective for the whole dict."""
    if not is_dist() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if mean:
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of scalar metrics over ranks (losses, accuracies)."""
    return all_reduce_sum(values, mean=True)
