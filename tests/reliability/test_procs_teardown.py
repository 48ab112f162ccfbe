"""Process teardown (mmemb/procs.py): a real tree of sleeping processes, all gone after."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from mmemb import procs

# A child that starts a grandchild in its own session (as an engine or a server job runner
# may), writes both pids, then sleeps; with ``stubborn`` every process ignores SIGTERM.
_TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    stubborn = sys.argv[1] == "1"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    leaf = ("import signal, time\\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if stubborn else "")
            + "time.sleep(600)")
    g = subprocess.Popen([sys.executable, "-c", leaf], start_new_session=True)
    print(os.getpid(), g.pid, flush=True)
    time.sleep(600)
""")


def _start_tree(stubborn: bool) -> tuple[subprocess.Popen, list[int]]:
    root = subprocess.Popen([sys.executable, "-c", _TREE, "1" if stubborn else "0"],
                            stdout=subprocess.PIPE, text=True)
    child, grandchild = map(int, root.stdout.readline().split())
    assert child == root.pid
    time.sleep(0.3)  # the grandchild has set its signal handler
    return root, [root.pid, grandchild]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("stubborn", [False, True], ids=["polite", "ignores-sigterm"])
def test_stop_tree_leaves_no_process(stubborn):
    root, pids = _start_tree(stubborn)
    assert all(psutil.pid_exists(p) for p in pids)
    t0 = time.monotonic()
    killed = procs.stop_tree(root, timeout=2.0)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert root.returncode is not None  # reaped: no zombie left behind
    # SIGTERM stops the polite tree at once; the stubborn one needs SIGKILL after 2 s
    assert sorted(killed) == (sorted(pids) if stubborn else [])
    assert root.returncode == (-signal.SIGKILL if stubborn else -signal.SIGTERM)
    assert time.monotonic() - t0 < (10 if stubborn else 5)


def test_stop_tree_of_a_finished_process_is_no_error():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert procs.stop_tree(p) == []
    assert procs.stop_tree(2**22 + 12345) == []  # no such pid


def test_reaping_stops_what_the_block_started_even_on_error():
    before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started: list[int] = []
        with pytest.raises(RuntimeError), procs.reaping(timeout=2.0):
            root, pids = _start_tree(stubborn=False)
            started += pids
            raise RuntimeError("the stage failed before its engine was closed")
        root.wait(5)
        assert all(_gone(p) for p in started)
        assert before.poll() is None  # a process from before the block is left alone
    finally:
        procs.stop_tree(before)


def test_a_launched_stage_past_its_timeout_leaves_no_process():
    from tasks.launch import StageFailed, _wait

    root, pids = _start_tree(stubborn=False)
    with pytest.raises(StageFailed, match="ran past timeout_s=1"):
        _wait(root, "train", 1)
    assert all(_gone(p) for p in pids)  # torchrun's ranks would otherwise keep the GPUs
