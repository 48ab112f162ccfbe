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
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


# --------------------------------------------------------------------------- DeepSpeed start-up
#
# DeepSpeed's first ``init_distributed`` on the CPU accelerator JIT-builds its shm comm op
# (torch.utils.cpp_extension, ninja + c++ into TORCH_EXTENSIONS_DIR): minutes, silent.
# :func:`init_deepspeed` says so and times it; :func:`warm_ops` builds it at setup.
# torch guards each op's build folder with ``<folder>/lock`` (torch.utils.file_baton): the
# builder creates it, keeps it open and deletes it when done; every other process polls
# until it is gone, without limit. A build killed midway leaves the file behind, and every
# later run then waited forever with no output (issue 13, item 21). The baton records no
# pid, but its owner keeps the file open: on Linux /proc/<pid>/fd shows who holds it.
# Rule: a lock no live process holds open, twice one second apart, is stale; it is removed
# with a message naming it (ninja rebuilds whatever the killed build left half-written: an
# output whose command is not in .ninja_log is out of date). A lock with a live owner is
# waited for, saying so, at most MMEMB_OP_BUILD_TIMEOUT_S (default 1800 s).

ENV_BUILD_WAIT = "MMEMB_OP_BUILD_TIMEOUT_S"
DEFAULT_BUILD_WAIT_S = 1800.0
#: What the shm op's build takes: ~80 s of CPU; 50-160 s wall on 2 busy cores, up to 282 s
#: beside other builds (measured; docs/reliability.md).
BUILD_TIME_HINT = "1-5 min on a busy 2-core machine"


class BuildLockError(RuntimeError):
    """An op build lock that will not go away (stale, or held past the wait limit)."""


def _print(msg: str) -> None:
    print(msg, flush=True)


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR`` or torch's default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: str | Path | None = None) -> list[Path]:
    """The op build locks under ``root`` (``<op>/lock``; torch's default root adds a
    ``py311_cpu``-style level)."""
    root = Path(root) if root is not None else extensions_root()
    if not root.is_dir():
        return []
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def lock_owners(lock: str | Path) -> list[int] | None:
    """Pids of the processes holding ``lock`` open, or None where /proc cannot tell.

    Processes whose fds this user may not read are not seen (the build folder is the
    user's own, so its builder is too)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    owners = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = os.listdir(d / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(d / "fd" / fd) == target:
                    owners.append(int(d.name))
                    break
            except OSError:
                continue
    return owners


def lock_is_stale(lock: str | Path, confirm_s: float = 1.0) -> bool | None:
    """True: no process holds ``lock`` (checked twice, ``confirm_s`` apart, same file);
    False: it is held, or gone; None: cannot tell (no /proc)."""
    lock = Path(lock)
    try:
        ino = lock.stat().st_ino
    except FileNotFoundError:
        return False
    owners = lock_owners(lock)
    if owners is None or owners:
        return None if owners is None else False
    time.sleep(confirm_s)  # the builder closes the file just before it deletes it
    try:
        if lock.stat().st_ino != ino:
            return False
    except FileNotFoundError:
        return False
    return lock_owners(lock) == []


def clear_stale_build_locks(root: str | Path | None = None,
                            say: Callable[[str], None] = _print,
                            confirm_s: float = 1.0) -> list[Path]:
    """Remove the stale op build locks under ``root`` (saying so); report live ones."""
    removed = []
    for lock in build_locks(root):
        stale = lock_is_stale(lock, confirm_s)
        if stale:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            say(f"removed a stale op build lock {lock}: no process holds it (a build of "
                f"{lock.parent.name} was killed); the op is rebuilt where needed")
        elif stale is None:
            say(f"op build lock {lock}: cannot tell whether a build holds it (no /proc); if "
                "no build is running, delete the file")
        elif lock.exists():
            say(f"op build lock {lock}: pid {', '.join(map(str, lock_owners(lock) or []))} "
                f"is building {lock.parent.name}; waiting for it (at most {build_wait_s():.0f}"
                f" s, {ENV_BUILD_WAIT})")
    return removed


def build_wait_s() -> float:
    try:
        return float(os.environ.get(ENV_BUILD_WAIT, DEFAULT_BUILD_WAIT_S))
    except ValueError:
        return DEFAULT_BUILD_WAIT_S


def bounded_wait(lock: str | Path, wait_seconds: float = 0.1,
                 timeout: float | None = None, say: Callable[[str], None] = _print,
                 check_every_s: float = 2.0, say_every_s: float = 30.0) -> None:
    """Wait for ``lock`` to go, like torch's baton, but: a lock whose owner died raises
    :class:`BuildLockError` (the lock removed), and so does one held past ``timeout``."""
    lock = Path(lock)
    timeout = build_wait_s() if timeout is None else timeout
    t0 = time.monotonic()
    next_check, next_say = t0 + min(check_every_s, 0.5), t0 + say_every_s
    while lock.exists():
        now = time.monotonic()
        if now >= next_check:
            next_check = now + check_every_s
            if lock_is_stale(lock):
                lock.unlink(missing_ok=True)
                raise BuildLockError(
                    f"{lock}: the build of {lock.parent.name} that held this lock is gone "
                    "(killed?); the stale lock was removed: run again to build the op")
        if now - t0 > timeout:
            owners = lock_owners(lock)
            who = f"pid {', '.join(map(str, owners))}" if owners else "an unknown process"
            raise BuildLockError(
                f"{lock}: waited {timeout:.0f}s for {who} to finish building "
                f"{lock.parent.name}. If that build is stuck, stop it and delete the file; "
                f"to wait longer set {ENV_BUILD_WAIT}=SECONDS")
        if now >= next_say:
            next_say = now + say_every_s
            say(f"waiting for the build of {lock.parent.name} (lock {lock}, "
                f"{now - t0:.0f}s so far)")
        time.sleep(wait_seconds)


def install_build_lock_guard(say: Callable[[str], None] = _print) -> None:
    """Make torch's op build baton wait with :func:`bounded_wait` (idempotent)."""
    from torch.utils import file_baton

    cls = file_baton.FileBaton
    if getattr(cls.wait, "_mmemb_bounded", False):
        return

    def wait(self) -> None:
        bounded_wait(self.lock_file_path, self.wait_seconds, say=say)

    wait._mmemb_bounded = True  # type: ignore[attr-defined]
    cls.wait = wait


def use_venv_ninja() -> str | None:
    """Build ops with the environment's own ninja (the ``ninja`` package DeepSpeed pulls in),
    whether or not the venv is activated: put its ``bin`` first on ``PATH``.

    Why: torch runs whichever ``ninja`` is first on ``PATH``. With ``.venv/bin`` on it (an
    activated shell, a Prefect process worker) that was the venv's ninja 1.13, without it
    (``.venv/bin/python ...``, ``make``) the system's 1.11, and each discards the other's
    build log (1.13: "build log version is too old; starting over"; 1.11: "command line
    changed"), so every switch rebuilt the shm op from scratch (1-5 min on 2 busy cores;
    the shared extensions folder showed six alternating rebuilds in an hour). Returns the
    ninja now used, None when the environment has none (then ``PATH`` decides, as before).
    """
    import shutil

    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").is_file():
        return shutil.which("ninja")
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if not parts or Path(parts[0]) != bindir:
        os.environ["PATH"] = os.pathsep.join([str(bindir), *[p for p in parts
                                                             if Path(p) != bindir]])
    return shutil.which("ninja")


def _accelerator() -> str:
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")


def _shm_op_needed() -> bool:
    """Will ``init_distributed`` build the shm comm op? (CPU accelerator only.) Not built
    yet, or ninja's dry run has work to do (say the log was written by another ninja)."""
    if _accelerator() != "cpu":
        return False
    folder = extensions_root() / "deepspeed_shm_comm"
    if not any(folder.glob("deepspeed_shm_comm*.so")):
        return True
    import shutil
    import subprocess

    ninja = shutil.which("ninja")
    if ninja is None or not (folder / "build.ninja").is_file():
        return False
    try:  # a dry run writes nothing (no log, no outputs)
        out = subprocess.run([ninja, "-n", "-C", str(folder)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "no work to do" not in out.stdout


def init_deepspeed(say: Callable[[str], None] = _print) -> float:
    """``deepspeed.init_distributed()``, saying what it does and how long it took; stale op
    build locks are cleared first and waits on live ones bounded. Returns the seconds."""
    t0 = time.perf_counter()
    use_venv_ninja()
    install_build_lock_guard(say)
    clear_stale_build_locks(say=say)
    what = (f"building its shm comm op into {extensions_root()} on first use, "
            f"{BUILD_TIME_HINT}" if _shm_op_needed() else "ops already built")
    say(f"initialising DeepSpeed ({what}; process group of {os.environ.get('WORLD_SIZE', 1)})"
        "...")
    import deepspeed

    init_process_group()  # single node: the store listens on 127.0.0.1 only
    deepspeed.init_distributed()  # reuses that group
    dt = time.perf_counter() - t0
    say(f"DeepSpeed initialised in {dt:.1f}s")
    return dt


def warm_ops(say: Callable[[str], None] = _print) -> float:
    """Build DeepSpeed's CPU shm comm op now (``make setup``), so no run waits on it."""
    t0 = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", _accelerator())
    if os.environ["DS_ACCELERATOR"] != "cpu":
        say("DeepSpeed ops: nothing to pre-build on a GPU machine")
        return 0.0
    use_venv_ninja()
    install_build_lock_guard(say)
    clear_stale_build_locks(say=say)
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        say("DeepSpeed ops: this accelerator has no shm comm op")
        return 0.0
    say(f"building DeepSpeed's shm comm op into {extensions_root()} (once, {BUILD_TIME_HINT})"
        "..." if _shm_op_needed() else "checking DeepSpeed's shm comm op (built already)...")
    builder.load(verbose=False)
    dt = time.perf_counter() - t0
    say(f"DeepSpeed shm comm op ready in {dt:.1f}s")
    return dt


if __name__ == "__main__":  # python -m mmemb.training.distributed warm
    if sys.argv[1:] != ["warm"]:
        sys.exit("usage: python -m mmemb.training.distributed warm")
    warm_ops()
