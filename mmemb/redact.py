"""Secrets out of everything the project writes: params, tags, spool files, summaries, logs.

Two checks, used together:

* by *name*: a key that names a secret (``token``, ``password``, ``*_KEY``...) with a value
  that is not a number, a bool or empty;
* by *shape*, anywhere in a text: credentials in URLs (``scheme://user:pass@host``, also
  with ``@`` inside the password, and a token as the URL's user), connection-string fields
  (``Password=...;``, ``password=... host=...``, ``?sig=...``), environment assignments
  (``AWS_SECRET_ACCESS_KEY=...``, ``HF_TOKEN=...``) and well-known token formats (``hf_``,
  ``ghp_``, ``sk-``, ``AKIA``, ``xox?-``).

Example::

    >>> redact_text("postgresql://mlflow:p@ss@db:5432/mlflow")
    'postgresql://mlflow:***@db:5432/mlflow'
    >>> redact_text("export OPENAI_API_KEY=abc123 && run")
    'export OPENAI_API_KEY=*** && run'
    >>> redact("sampling.max_tokens", "96")
    '96'
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

#: A key whose (non-numeric) value is a secret.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|"
                        r"credential|auth|(^|[_.-])key$)", re.IGNORECASE)
# scheme://user:password@host: the password runs to the *last* '@' before the path, so
# one holding '@' is hidden whole.
_URL_CRED = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/:@\s]*):"
                       r"(?P<pw>[^/\s]*)@")
# scheme://TOKEN@host: a long user name without a password is a token (git, HF, PATs).
_URL_TOKEN_USER = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/:@\s]{16,}@")
_TOKEN = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                    r"github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{20,}|"
                    r"AKIA[0-9A-Z]{16}|xox[baprs]-[A-Za-z0-9-]{10,})\b")
# a value ends at ; , whitespace or a quote, and at & only where a new "name=" follows
# (a URL query), so "Password=Tr0ub4dor&3;" is hidden whole
_VALUE = (r"(?P<v>\"[^\"]*\"|'[^']*'|[^\s;&,\"'<>]+"
          r"(?:&(?![A-Za-z0-9_.-]+=)[^\s;&,\"'<>]*)*)")
# Connection strings: ADO/ODBC ("Password=x;"), libpq ("password=x host=db"), URL queries
# ("?password=x&", "&sig=x"), Azure ("AccountKey=x;").
_CONN_FIELD = re.compile(r"(?P<k>\b(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|"
                         r"access[_-]?key|account[_-]?key|shared[_-]?access[_-]?key|"
                         r"client[_-]?secret|sig|x-amz-signature|x-amz-credential))"
                         r"\s*=\s*" + _VALUE, re.IGNORECASE)
# NAME_KEY=value, NAME_TOKEN=value, ... (shell, .env files, docker -e, logs of env).
_ENV_ASSIGN = re.compile(r"(?P<k>\b[A-Za-z0-9_]*_(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD|"
                         r"CREDENTIALS?))\s*=\s*" + _VALUE, re.IGNORECASE)
#: ``${NAME}``: a reference to an environment variable, expanded where it is used; what a
#: config holds instead of a secret.
ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def redact_text(text: str) -> str:
    """``text`` with every secret-shaped part replaced by ``***``."""
    if not text:
        return text
    text = _URL_CRED.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _URL_TOKEN_USER.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _CONN_FIELD.sub(lambda m: f"{m['k']}={REDACTED}", text)
    text = _ENV_ASSIGN.sub(lambda m: f"{m['k']}={REDACTED}", text)
    return _TOKEN.sub(REDACTED, text)


_SPECIAL = re.compile(r"<[^<>\s]{1,40}>")  # a special token such as <think>, not a secret


def _plain(value: str) -> bool:
    """A value that cannot be a secret: empty, None-ish, a number or a bool."""
    v = value.strip()
    if v in ("", "None", "null", "true", "false", "True", "False") or _SPECIAL.fullmatch(v):
        return True
    try:
        float(v)
        return True
    except ValueError:
        return False


def secret_key(key: str) -> bool:
    """Does the (last part of a dotted) key name a secret?"""
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact(key: str, value: str) -> str:
    """Hide ``value`` if ``key`` names a secret (unless it is plainly not one), else hide
    the secret-shaped parts of it."""
    value = str(value)
    if secret_key(key) and not _plain(value) and not ENV_REF.match(value.strip()):
        return REDACTED
    return redact_text(value)


def redact_obj(obj: Any, key: str = "") -> Any:
    """A JSON-like structure with every string redacted (by its key and its shape)."""
    if isinstance(obj, dict):
        return {k: redact_obj(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, key) for v in obj]
    if isinstance(obj, str):
        return redact(key, obj) if key else redact_text(obj)
    return obj


def find_secrets(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``obj`` (a config dump) whose string value holds a secret by its
    shape; under an ``env`` mapping also by its name (a ``${NAME}`` reference is fine)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, str) and prefix.rsplit(".", 1)[-1] == "env" and secret_key(str(k)) \
                    and not _plain(v) and not ENV_REF.match(v.strip()):
                out.append(path)
            else:
                out += find_secrets(v, path)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += find_secrets(v, f"{prefix}.{i}")
    elif isinstance(obj, str) and redact_text(obj) != obj:
        out.append(prefix)
    return out
