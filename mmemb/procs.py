"""The one home for stopping processes: a process and everything it started.

Why: a stage's processes start their own (torchrun its ranks, a vLLM engine its engine
core and workers, ``mlflow server`` its job runner). Stopping only the process we started
orphans the rest, which then hold GPU memory, ports and file locks until the machine is
rebooted. So teardown walks the whole tree with psutil (children found by parent links,
not by process group: a child that started its own session is still found), asks every
process to stop (SIGTERM), waits, and kills (SIGKILL) what is left.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

import psutil


def _tree(pid: int, include_root: bool) -> list[psutil.Process]:
    """``pid``'s descendants (and itself), gathered before any of them is signalled: once a
    parent dies its children are re-parented and can no longer be found from it."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [root, *procs] if include_root else procs


def stop_processes(procs: list[psutil.Process], timeout: float = 10.0,
                   popen: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM every process (and ``popen``), wait up to ``timeout`` s for all, SIGKILL the
    survivors. Returns the pids that had to be killed. ``popen`` is waited for through
    :class:`subprocess.Popen` itself, so its ``returncode`` is the real one."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.terminate()
    if popen is not None and popen.poll() is None:
        popen.terminate()
    deadline = time.monotonic() + timeout
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    killed = [p.pid for p in alive]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    if popen is not None:
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
            killed.append(popen.pid)
    return killed


def stop_tree(target: int | subprocess.Popen, timeout: float = 10.0, *,
              include_root: bool = True) -> list[int]:
    """Stop a process and all its descendants; returns the pids that needed SIGKILL.

    ``target``: a pid or a :class:`subprocess.Popen` (which is then reaped, so its
    ``returncode`` is set). A process that is already gone is no error.
    """
    if isinstance(target, subprocess.Popen) and target.poll() is not None:
        return []  # reaped: its pid may already belong to an unrelated process
    popen = target if isinstance(target, subprocess.Popen) and include_root else None
    pid = target.pid if isinstance(target, subprocess.Popen) else int(target)
    tree = _tree(pid, include_root and popen is None)
    return stop_processes(tree, timeout, popen)


def descendants() -> set[int]:
    """The pids of every live descendant of this process."""
    return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}


@contextlib.contextmanager
def reaping(timeout: float = 30.0) -> Iterator[None]:
    """Stop, on leaving the block (normally or by an exception), every process started
    inside it that is still alive, with its own children: an engine whose polite shutdown
    failed or was never reached cannot outlive the stage. Processes that existed before
    the block are left alone."""
    before = descendants()
    try:
        yield
    finally:
        me = psutil.Process(os.getpid())
        new = [p for p in me.children(recursive=True) if p.pid not in before]
        stop_processes(new, timeout)


__all__ = ["descendants", "reaping", "stop_processes", "stop_tree"]
