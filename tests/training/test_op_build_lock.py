"""DeepSpeed's op build locks (issue 13, items 3 and 21): a lock left by a killed build is
found and removed with a message naming it, a live build is waited for with a bound, and
torch's own baton wait no longer spins forever."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mmemb.training import distributed as D

ROOT = Path(__file__).resolve().parents[2]
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                reason="lock owners are read from /proc (Linux)")

_HOLD = ("import os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does\n"
         "print('held', flush=True)\n"
         "time.sleep(300)\n")


def _plant(root: Path, op: str = "deepspeed_shm_comm") -> Path:
    (root / op).mkdir(parents=True)
    lock = root / op / "lock"
    lock.write_text("")  # a killed build's leftover: nobody holds it open
    return lock


def _holder(lock: Path) -> subprocess.Popen:
    """A live 'builder': creates the lock like torch's baton and keeps it open."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@needs_proc
def test_a_stale_lock_is_found_removed_and_named(tmp_path):
    lock = _plant(tmp_path)
    assert D.build_locks(tmp_path) == [lock]
    assert D.lock_owners(lock) == []
    said = []
    assert D.clear_stale_build_locks(tmp_path, say=said.append, confirm_s=0.05) == [lock]
    assert not lock.exists()
    assert len(said) == 1 and str(lock) in said[0] and "stale" in said[0]
    assert D.build_locks(tmp_path) == []


@needs_proc
def test_a_live_build_is_kept_and_waited_for_with_a_bound(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    holder = _holder(lock)
    try:
        assert D.lock_owners(lock) == [holder.pid]
        said = []
        assert D.clear_stale_build_locks(tmp_path, say=said.append, confirm_s=0.05) == []
        assert lock.exists() and str(holder.pid) in said[0] and str(lock) in said[0]
        with pytest.raises(D.BuildLockError) as e:
            D.bounded_wait(lock, timeout=1.0, say=said.append, check_every_s=0.2)
        msg = str(e.value)
        assert str(lock) in msg and str(holder.pid) in msg and D.ENV_BUILD_WAIT in msg
        assert lock.exists()  # a live owner's lock is never removed
    finally:
        holder.kill()
        holder.wait()


@needs_proc
def test_an_owner_killed_during_the_wait_ends_it(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    holder = _holder(lock)
    out: dict = {}

    def wait():
        try:
            D.bounded_wait(lock, timeout=120, check_every_s=0.2, say=lambda m: None)
            out["returned"] = True
        except D.BuildLockError as e:
            out["error"] = str(e)

    t = threading.Thread(target=wait)
    t.start()
    os.kill(holder.pid, signal.SIGKILL)  # the build dies; its lock file stays
    holder.wait()
    t.join(60)
    assert not t.is_alive()
    assert "gone" in out.get("error", "") and str(lock) in out["error"]
    assert not lock.exists()


@needs_proc
@pytest.mark.timeout(90)
def test_torchs_baton_wait_is_bounded_once_guarded(tmp_path):
    """torch's FileBaton.wait() polls while the file exists, forever; guarded it ends."""
    from torch.utils.file_baton import FileBaton

    lock = _plant(tmp_path)
    D.install_build_lock_guard(say=lambda m: None)
    D.install_build_lock_guard(say=lambda m: None)  # idempotent
    baton = FileBaton(str(lock))
    assert baton.try_acquire() is False  # the leftover blocks a new build...
    with pytest.raises(D.BuildLockError, match="stale lock was removed"):
        baton.wait()  # ...and the wait ends with the file named instead of hanging
    assert not lock.exists()


def test_the_start_up_says_when_the_shm_op_will_be_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # use_venv_ninja edits it
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert D.extensions_root() == tmp_path
    assert D._shm_op_needed()
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    (op / "deepspeed_shm_comm.so").write_bytes(b"")
    assert not D._shm_op_needed()
    ninja = D.use_venv_ninja()
    if ninja:  # built, but ninja would still rebuild (an output out of date): say so
        (op / "build.ninja").write_text("rule touch\n  command = touch $out\n"
                                        "build stamp: touch\n")
        assert D._shm_op_needed()
        subprocess.run([ninja, "-C", str(op)], check=True, capture_output=True)
        assert not D._shm_op_needed()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    shutil.rmtree(tmp_path / "deepspeed_shm_comm")
    assert not D._shm_op_needed()


@needs_proc
@pytest.mark.slow  # ~20 s, but minutes when the copied op has to be rebuilt
def test_deepspeed_starts_past_a_stale_lock_and_says_so(tmp_path):
    """The real path: DeepSpeed's init_distributed loads the (already built) shm op from an
    extensions folder holding a killed build's lock. Unguarded it waits forever."""
    built = D.extensions_root() / "deepspeed_shm_comm"
    if not any(built.glob("deepspeed_shm_comm*.so")) or (built / "lock").exists():
        pytest.skip(f"the shm op is not built in {built.parent} (or a build is running)")
    shutil.copytree(built, tmp_path / "deepspeed_shm_comm", symlinks=True,  # keeps mtimes
                    ignore=shutil.ignore_patterns("lock"))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.write_text("")  # a killed build's leftover
    code = ("import os\nfrom mmemb.training.distributed import free_port, init_deepspeed\n"
            "os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', "
            "MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))\n"
            "init_deepspeed()\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"removed a stale op build lock {lock}" in p.stdout
    assert "initialising DeepSpeed (ops already built" in p.stdout
    assert "DeepSpeed initialised in" in p.stdout
    assert not lock.exists()


def test_ops_are_built_with_the_environments_own_ninja(monkeypatch):
    """Two ninjas (the venv's 1.13, the system's 1.11) discard each other's build log:
    whichever PATH finds first must always be the same one, the environment's."""
    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").is_file():
        pytest.skip("this environment has no ninja of its own")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", str(bindir)]))
    assert D.use_venv_ninja() == str(bindir / "ninja")
    parts = os.environ["PATH"].split(os.pathsep)
    assert parts[0] == str(bindir) and parts.count(str(bindir)) == 1 and "/usr/bin" in parts
    assert D.use_venv_ninja() == str(bindir / "ninja")  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == parts


def test_training_start_up_says_what_it_is_doing(tiny_model, synth, tmp_path, capsys,
                                                monkeypatch):
    """The 77-136 s that were silent: import, op build (or not), process group, each timed."""
    from mmemb.configs.train import TrainConfig
    from mmemb.stages import train

    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    D.use_venv_ninja()  # the ninja the start-up builds with decides whether it builds

    cfg = TrainConfig(model=str(tiny_model), pairs=str(synth["pairs"]),
                      image_root=str(synth["image_root"]), out=str(tmp_path), batch_size=128)
    builds = D._shm_op_needed()  # decided before the start-up, which may build it
    with pytest.raises(ValueError, match="fewer than one global contrastive batch"):
        train.run(cfg)  # refused right after the start-up: what it printed is all we need
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[train]")]
    assert lines[0] == "[train] importing DeepSpeed..."
    assert lines[1].startswith("[train] DeepSpeed ") and " imported in " in lines[1]
    assert lines[2].startswith("[train] initialising DeepSpeed (")
    assert ("building its shm comm op into" in lines[2]) is builds
    assert ("ops already built" in lines[2]) is not builds
    assert lines[3].startswith("[train] DeepSpeed initialised in ")
