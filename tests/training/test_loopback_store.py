"""Issue 13, item 17: in a single-node run torch's TCPStore listens on 127.0.0.1 only (torch
binds every interface whatever MASTER_ADDR says); multi-node runs keep torch's path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Listening TCP sockets of this process, from /proc (no ss/netstat needed).
_LISTENERS = textwrap.dedent("""
    import os, socket, struct
    def listeners(pid):
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        out = []
        for fam, name in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
            with open(f"/proc/net/{name}") as f:
                for line in list(f)[1:]:
                    parts = line.split()
                    if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                        continue
                    addr, port = parts[1].split(":")
                    raw = bytes.fromhex(addr)
                    if fam == socket.AF_INET:
                        ip = socket.inet_ntop(fam, raw[::-1])
                    else:
                        ip = socket.inet_ntop(fam, b"".join(raw[i:i + 4][::-1]
                                                            for i in range(0, 16, 4)))
                    out.append([ip, int(port, 16)])
        return out
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    full = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    return subprocess.run([sys.executable, "-c", _LISTENERS + textwrap.dedent(script)],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


_ENV1 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
         "MASTER_ADDR": "127.0.0.1"}


def _listening(p: subprocess.CompletedProcess) -> list[list]:
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("LISTEN"))
    return json.loads(line.split(" ", 1)[1])


def test_single_process_store_listens_on_loopback_only():
    port = _free_port()
    listening = _listening(_run("""
        import json, os, torch, torch.distributed as dist
        from mmemb.training.distributed import init_process_group
        assert init_process_group("gloo") is True
        t = torch.ones(1); dist.all_reduce(t)
        print("LISTEN", json.dumps(listeners(os.getpid())))
        dist.destroy_process_group()
    """, {**_ENV1, "MASTER_PORT": str(port)}))
    assert [ip for ip, prt in listening if prt == port] == ["127.0.0.1"]
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening


@pytest.mark.slow  # DeepSpeed's CPU init loads (first time: builds) its shm op: 7-100 s
def test_deepspeed_init_reuses_the_loopback_group():
    """What stages 4 and 5 do in a plain run: our group first, then DeepSpeed's init."""
    port = _free_port()
    listening = _listening(_run("""
        import json, os, deepspeed, torch, torch.distributed as dist
        from mmemb.training.distributed import init_process_group
        assert init_process_group() is True
        deepspeed.init_distributed()
        t = torch.ones(1); dist.all_reduce(t)
        print("LISTEN", json.dumps(listeners(os.getpid())))
        deepspeed.comm.destroy_process_group()
    """, {**_ENV1, "MASTER_PORT": str(port)}))
    assert [ip for ip, prt in listening if prt == port] == ["127.0.0.1"]
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening


def test_torch_alone_would_listen_on_every_interface():
    """The reason for the helper (a check of torch's behaviour, not of ours)."""
    port = _free_port()
    p = _run(f"""
        import datetime, json, os, torch.distributed as dist
        s = dist.TCPStore("127.0.0.1", {port}, 1, True, datetime.timedelta(seconds=30))
        print("LISTEN", json.dumps(listeners(os.getpid())))
    """, {})
    assert p.returncode == 0, p.stderr[-4000:]
    listening = json.loads(p.stdout.split("LISTEN ", 1)[1])
    assert {ip for ip, prt in listening if prt == port} & {"0.0.0.0", "::"}


def test_two_ranks_on_one_node_meet_at_the_loopback_store():
    port = _free_port()
    script = """
        import os, torch, torch.distributed as dist
        from mmemb.training.distributed import init_process_group
        assert init_process_group("gloo") is True
        t = torch.tensor([float(dist.get_rank() + 1)]); dist.all_reduce(t)
        print("SUM", t.item())
        dist.destroy_process_group()
    """
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    full = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    procs = [subprocess.Popen([sys.executable, "-c", _LISTENERS + textwrap.dedent(script)],
                              cwd=ROOT, env={**full, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    assert all("SUM 3.0" in o for o, _ in outs)


def test_multi_node_keeps_torchs_own_store(monkeypatch):
    from mmemb.training import distributed as d

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert d.single_node() is False
    assert d.init_process_group("gloo") is False  # left to torch / the launcher
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert d.single_node() is True
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # ranks may come from elsewhere
    assert d.single_node() is False


_WORKER = """
import json, os, sys
sys.path.insert(0, os.environ["LISTEN_HELPER_DIR"])
from listen_helper import listeners
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1); dist.all_reduce(t)
if dist.get_rank() == 0:
    print("AGENT", json.dumps(listeners(os.getppid())), flush=True)
    print("MASTER", os.environ["MASTER_ADDR"], flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_single_node_torchrun_stores_listen_on_loopback(tmp_path):
    """`launcher: torchrun` on one node: the agent's rendezvous and shared stores."""
    from mmemb.configs.pipeline import LaunchConfig
    from tasks.launch import build_command

    cmd = build_command(LaunchConfig(launcher="torchrun", nproc_per_node=2), "train",
                        Path("c.yaml"), Path("r.json"), python="py")
    assert cmd[:3] == ["py", "-m", "mmemb.training.torchrun_local"]
    assert "--standalone" in cmd and "--local-addr=127.0.0.1" in cmd
    (tmp_path / "listen_helper.py").write_text(_LISTENERS)
    (tmp_path / "w.py").write_text(_WORKER)
    p = subprocess.run([sys.executable, *cmd[1:cmd.index("tasks.worker") - 1],
                        str(tmp_path / "w.py")], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, env={**os.environ, "LISTEN_HELPER_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-4000:]
    agent = json.loads(p.stdout.split("AGENT ", 1)[1].splitlines()[0])
    assert len(agent) >= 1 and {ip for ip, _ in agent} == {"127.0.0.1"}, agent
    assert "MASTER 127.0.0.1" in p.stdout
