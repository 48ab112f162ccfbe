"""Run a command with a file-size limit: ``python fsize_limit.py BYTES CMD ARGS...``.

A write that would grow any file past BYTES fails with EFBIG ("File too large") instead of
completing, as if the disk filled up at that point, for this process and its children
only (RLIMIT_FSIZE), so no root, tmpfs or loop device is needed. SIGXFSZ, which the kernel
sends with EFBIG and which terminates a process by default, is ignored (an ignored signal
stays ignored across exec); the write then fails with the error a program must handle.
"""

import os
import resource
import signal
import sys

if __name__ == "__main__":
    limit = int(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    os.execvp(sys.argv[2], sys.argv[2:])
