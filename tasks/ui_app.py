"""``mlflow server --app-name mmemb``: the MLflow app, opening in "Model training" mode.

Why: MLflow 3.17's UI picks between its GenAI pages and its classic runs pages from a
per-browser setting (localStorage ``mlflow.workflowType_v1``, default ``genai``); the
experiment tag ``mlflow.experimentKind`` is not consulted. So a fresh browser opened on
``mmemb ui`` would land on the GenAI "Overview" of a classic ML experiment. This wrapper
serves the same app and adds, to the HTML page only, a one-line script that sets that
setting to ``machine_learning`` when the browser has none: a user's own later choice (the
sidebar switch) is kept. Every other request passes through untouched.

Registered as the ``mlflow.app`` entry point ``mmemb`` (pyproject.toml), which is how
``mlflow server --app-name`` finds apps; :func:`tasks.mlflow_server.start_server` uses it
when it is installed. A team's own server is not ours to wrap: there the links mmemb prints
carry ``?workflowType=machine_learning`` (docs/ui.md).
"""

from __future__ import annotations

from mlflow.server.fastapi_app import app as mlflow_app

#: localStorage key and value the UI reads (its hook stores JSON strings).
SETTING_SCRIPT = (b'<script>try{var k="mlflow.workflowType_v1";if(!localStorage.getItem(k))'
                  b'localStorage.setItem(k,JSON.stringify("machine_learning"))}catch(e){}'
                  b'</script>')
_PAGES = ("/", "/index.html")


def with_setting(html: bytes) -> bytes:
    """The page with :data:`SETTING_SCRIPT` first in its ``<head>`` (unchanged if none)."""
    return html.replace(b"<head>", b"<head>" + SETTING_SCRIPT, 1) if b"<head>" in html else html


class DefaultToRunsApp:
    """An ASGI app: ``mlflow_app``, with the HTML page rewritten by :func:`with_setting`.

    A class instance, not a function: MLflow treats a plain function given as an app as a
    factory to call."""

    def __init__(self, inner=mlflow_app):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        """Pass every request through; the HTML page's response is held and rewritten."""
        if scope["type"] != "http" or scope.get("path") not in _PAGES:
            return await self.inner(scope, receive, send)
        start: dict = {}
        body: list[bytes] = []

        async def rewrite(message):
            """Hold the page's response until its body is complete, then send it rewritten
            (the length header follows the new body; the etag no longer matches it)."""
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            html = b"".join(body)
            headers = list(start.get("headers", []))
            if dict(headers).get(b"content-type", b"").startswith(b"text/html"):
                html = with_setting(html)
                headers = [(k, v) for k, v in headers if k not in (b"content-length", b"etag")]
                headers.append((b"content-length", str(len(html)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": html})

        return await self.inner(scope, receive, rewrite)


app = DefaultToRunsApp()
