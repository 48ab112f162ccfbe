"""``torchrun`` for one node, with every TCPStore it hosts listening on 127.0.0.1 only.

torch's TCPStore binds every interface whatever host it is given, and a single-node
``torchrun --standalone`` hosts two (the rendezvous store and the store its workers
share, ``TORCHELASTIC_USE_AGENT_STORE``). This entry point gives each store a socket bound
to loopback (``master_listen_fd``) and advertises 127.0.0.1 to the workers
(``--local-addr``), then runs torchrun unchanged::

    python -m mmemb.training.torchrun_local --standalone --nproc-per-node=2 -m tasks.worker ...

:func:`tasks.launch.build_command` uses it for ``launcher: torchrun`` with one node and no
``rdzv_endpoint``; multi-node runs use ``torch.distributed.run`` itself (their store must
be reachable from the other nodes).
"""

from __future__ import annotations

import datetime
import socket
import sys

import torch.distributed as dist

_TCPStore = dist.TCPStore


def _loopback_fd(port: int) -> tuple[int, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock.detach(), port  # the store owns the socket from here


class LoopbackTCPStore(_TCPStore):
    """A TCPStore whose server (``is_master``) listens on 127.0.0.1; clients unchanged."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None,
                 is_master: bool = False,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=300),
                 wait_for_workers: bool = True, multi_tenant: bool = False,
                 master_listen_fd: int | None = None, use_libuv: bool = True):
        if is_master and master_listen_fd is None:
            master_listen_fd, port = _loopback_fd(port)
            host_name = "127.0.0.1"
        super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers,
                         multi_tenant, master_listen_fd, use_libuv)


def patch() -> None:
    """Every place torchrun's agent creates a TCPStore from."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    dist.TCPStore = LoopbackTCPStore
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith(("--local-addr", "--local_addr")) for a in args):
        args = ["--local-addr=127.0.0.1", *args]
    patch()
    from torch.distributed.run import main as torchrun

    torchrun(args)


if __name__ == "__main__":
    main()
