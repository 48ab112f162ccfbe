"""Start-up waits of the services a run starts for itself, generous and explained.

* Prefect's temporary API server: without ``PREFECT_API_URL`` every flow run starts one
  (``uvicorn`` over a SQLite database). Prefect waits 20 s for it by default, and on a busy
  2-core machine it needed 41-331 s (issue 13), so ``mmemb run`` failed before any stage.
  The wait here is :data:`DEFAULT_PREFECT_TIMEOUT_S` unless set, in this order, by
  ``--prefect-timeout``, ``run.prefect_startup_timeout_s`` in the config, or Prefect's own
  ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``. The server is started before the
  flow (:func:`prefect_startup`), so the console says what it is waiting for and how long
  it took, and a failure is a :class:`StartupTimeout` whose message says what to set.
* The MLflow UI (``mmemb ui``, :func:`tasks.mlflow_server.wait_healthy`): same default,
  ``--timeout``.

Nothing here imports Prefect at module level (``mmemb --help`` stays light).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.mlflow_server import DEFAULT_UI_TIMEOUT_S  # noqa: F401 - listed with the others

#: Prefect's own setting (prefect/settings/models/server/ephemeral.py, Prefect 3.7).
PREFECT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
#: Generous: the slowest start measured on a loaded 2-core machine was 331 s.
DEFAULT_PREFECT_TIMEOUT_S = 600
_PREFECT_TIMEOUT_TEXT = "Timed out while attempting to connect to ephemeral Prefect API server"


class StartupTimeout(RuntimeError):
    """A service the run starts for itself did not come up; the message says what to set."""


def prefect_timeout(cli: int | None = None, config: int | None = None) -> tuple[int, str]:
    """(seconds, where they came from): ``--prefect-timeout``, then the config's
    ``run.prefect_startup_timeout_s``, then ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
    then :data:`DEFAULT_PREFECT_TIMEOUT_S`."""
    if cli is not None:
        return int(cli), "--prefect-timeout"
    if config is not None:
        return int(config), "run.prefect_startup_timeout_s"
    env = os.environ.get(PREFECT_ENV, "").strip()
    if env:
        try:
            return int(float(env)), PREFECT_ENV
        except ValueError:
            from mmemb.configs.base import ConfigError

            raise ConfigError(f"{PREFECT_ENV}={env!r}: not a number of seconds") from None
    return DEFAULT_PREFECT_TIMEOUT_S, "the default"


def prefect_message(timeout: int, source: str, cause: BaseException | str) -> str:
    text = str(cause)
    exited = "exited with code" in text
    lines = [f"Prefect's temporary API server did not answer within {timeout}s (the wait was "
             f"set by {source})."]
    if exited:
        lines.append("Its process exited, so a longer wait will not help: its output is "
                     "quoted below.")
    else:
        lines.append("On a busy machine it can need minutes (41-331 s were measured on a "
                     "loaded 2-core machine). Set a longer wait, one of:")
        lines += [f"  mmemb run CONFIG --prefect-timeout {max(2 * timeout, 1200)}",
                  f"  run: {{prefect_startup_timeout_s: {max(2 * timeout, 1200)}}}  "
                  "(in the config)",
                  f"  export {PREFECT_ENV}={max(2 * timeout, 1200)}"]
    lines.append("Or start a server once and reuse it: `prefect server start`, then "
                 "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    lines.append(f"Prefect said: {text[:2000]}")
    return "\n".join(lines)


def _start_ephemeral(timeout: int, source: str, announce: bool) -> None:
    """Start Prefect's temporary server now (as the flow would), saying so and timing it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return  # a server is configured (or ephemeral mode is off): nothing to start
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # another Prefect layout: the flow starts it (with the setting)
        return
    server = SubprocessASGIServer()
    if server.running:
        return
    if announce:
        print(f"[prefect] starting a temporary local API server (PREFECT_API_URL is unset); "
              f"waiting up to {timeout}s for it ({source})", flush=True)
    t0 = time.perf_counter()
    server.start(timeout=timeout)
    if announce:
        print(f"[prefect] temporary API server up at {server.api_url} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


@contextmanager
def prefect_startup(timeout: int = DEFAULT_PREFECT_TIMEOUT_S, source: str = "the default",
                    announce: bool = True) -> Iterator[None]:
    """Run flows inside: Prefect waits ``timeout`` s for its temporary server (the setting
    and the environment variable, for threads and processes that read it afresh), the
    server is started up front, and its time-out becomes a :class:`StartupTimeout`."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as SETTING
    from prefect.settings import temporary_settings

    old = os.environ.get(PREFECT_ENV)
    os.environ[PREFECT_ENV] = str(timeout)
    try:
        with temporary_settings({SETTING: timeout}):
            try:
                _start_ephemeral(timeout, source, announce)
                yield
            except RuntimeError as e:
                if _PREFECT_TIMEOUT_TEXT in str(e) and not isinstance(e, StartupTimeout):
                    raise StartupTimeout(prefect_message(timeout, source, e)) from e
                raise
    finally:
        if old is None:
            os.environ.pop(PREFECT_ENV, None)
        else:
            os.environ[PREFECT_ENV] = old
