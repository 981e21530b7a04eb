"""Logs: a JSON formatter for the standard logging module, request ids, and the access log.

`configure(format, level)` puts one handler on the root logger (stderr): JSON objects, one a
line (`json`), or plain lines (`text`). uvicorn's own loggers propagate to it; its access log is
replaced by `AccessLog`. For every request, the request envelope (service/envelope.py)

- takes the request id from the `X-Request-ID` header when it is usable (printable ASCII, at
  most 128 characters) and otherwise makes one (`new_request_id`: 32 hex digits);
- echoes it in the `X-Request-ID` header of every response, errors included;
- writes one line to the `instanas.access` logger (`AccessLog`): method, path, status,
  duration_ms, request id, and what the handler noted in `notes(scope)` (the architecture
  code of each image, the operating point, the model version).

While a request is handled on the event loop, every record logged carries its request id.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is in the serve extra
    orjson = None

HEADER = b"x-request-id"
MAX_REQUEST_ID = 128
ACCESS_LOGGER = "instanas.access"
NOTES_KEY = "instanas.notes"  # the ASGI scope key of the handler's notes for the access log

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("instanas_request_id", default=None)

# LogRecord attributes that are not `extra` fields (plus uvicorn's colour copy of the message).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                                  "color_message", "taskName"}


def request_id_from(value: bytes | None) -> str:
    """The client's request id when usable (printable ASCII, 1..128 characters), else a new one."""
    if value and len(value) <= MAX_REQUEST_ID and all(0x20 <= b < 0x7F for b in value) and value.strip():
        return value.decode("ascii")
    return new_request_id()


def _new_process_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = uuid.uuid4().hex[:16], itertools.count(1)


_new_process_ids()
os.register_at_fork(after_in_child=_new_process_ids)  # a forked worker numbers its requests under its own prefix


def new_request_id() -> str:
    """32 hex digits, as a uuid4's hex: 16 random ones drawn once per process, then the process's
    request count. Unique across workers and restarts as a uuid4 is, without its system call for
    random bytes on every request."""
    return f"{_id_prefix}{next(_id_counter):016x}"


def current_request_id() -> str | None:
    """The id of the request being handled on this task (None outside a request or in a worker thread)."""
    return _request_id.get()


def notes(scope) -> dict:
    """The dict in which a handler notes what the access log line should say about its request
    (keys: architecture, operating_point, model, model_version); a throwaway one without the envelope."""
    return scope.setdefault(NOTES_KEY, {})


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO 8601), level, logger, message, the process id (which
    worker, with several), the record's extra fields, the request id when there is one, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = _head(record.created, record.levelname, record.name, record.getMessage(), record.process)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if "request_id" not in out and (rid := _request_id.get()) is not None:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return _dumps(out)


def _head(created: float, level: str, logger: str, message: str, pid: int | None) -> dict:
    """The fields every JSON line begins with."""
    return {"time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"), "level": level,
            "logger": logger, "message": message, "pid": pid}


def _dumps(out: dict) -> str:
    """One JSON line, compact; orjson where installed (a tenth of json's time), json for what orjson
    refuses (an integer past 64 bits, a key that is not a string)."""
    if orjson is not None:
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:
            pass
    return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(log_format: str = "json", level: str = "info") -> logging.Handler:
    """One stderr handler on the root logger, in `log_format` (json or text), at `level`; replaces
    the handler a previous call installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler._instanas = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_instanas", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def bind_request_id(rid: str) -> contextvars.Token:
    """Records logged on this task from now on carry `rid` (service/envelope.py binds each request's)."""
    return _request_id.set(rid)


def unbind_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


class AccessLog:
    """One access line per request to the `instanas.access` logger (see the module docstring);
    `enabled=False` writes none."""

    def __init__(self, enabled: bool = True, logger: str = ACCESS_LOGGER):
        self.enabled, self.log = enabled, logging.getLogger(logger)

    def write(self, scope, rid: str, status: int, duration_ms: float) -> None:
        if not (self.enabled and self.log.isEnabledFor(logging.INFO)):
            return
        noted = scope.get(NOTES_KEY) or {}
        model, version = noted.get("model"), noted.get("model_version")
        if version is None:  # the default model, for requests that classified nothing
            models = getattr(getattr(scope.get("app"), "state", None), "models", None)
            if models is not None:
                default = models.get()
                model, version = default.name, default.manifest.version
        client = scope.get("client")
        fields = {
            "request_id": rid,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "query": scope.get("query_string", b"").decode("latin-1") or None,
            "status": status,
            "duration_ms": round(duration_ms, 3),
            "client": client[0] if client else None,
            "architecture": noted.get("architecture"),
            "operating_point": noted.get("operating_point"),
            "model": model,
            "model_version": version,
        }
        target = fields["path"] + (f"?{fields['query']}" if fields["query"] else "")
        text = (f'{fields["client"] or "-"} "{fields["method"]} {target}" {status} {fields["duration_ms"]:.1f}ms '
                f"request_id={rid}")
        if fields["architecture"]:
            text += f" architecture={','.join(fields['architecture'])} operating_point={fields['operating_point'] or '-'}"
        text += f" model={model or '-'} model_version={version or '-'}"
        handler = self._only_handler()
        if handler is not None:
            line = _dumps({**_head(time.time(), "INFO", self.log.name, text, os.getpid()), **fields})
            try:
                with handler.lock:
                    handler.stream.write(line + handler.terminator)
                    handler.stream.flush()
                return
            except Exception:  # noqa: BLE001 - a stream that fails: the logging module reports it, as for any record
                pass
        # Logger.info less its search of the call stack for the caller's file and line (the
        # envelope's frames, a fifth of the line's cost): every handler and filter sees it.
        self.log.handle(self.log.makeRecord(self.log.name, logging.INFO, __file__, 0, text, (), None, extra=fields))

    def _only_handler(self) -> logging.StreamHandler | None:
        """`configure()`'s JSON handler when it is the only handler an access line reaches and
        nothing could filter or change the line on its way: then the line is written to its stream
        directly, as JsonFormatter would write the record, without making the record (together
        two thirds of the line's cost). Else None, and the line goes through the logging module: so
        with a record factory of its own, level names of its own, or no process ids in records."""
        log = self.log
        if log.filters or type(log) is not logging.Logger or logging.getLogRecordFactory() is not logging.LogRecord \
                or not logging.logProcesses or logging.getLevelName(logging.INFO) != "INFO":
            return None
        found, logger = None, log
        while logger is not None:
            for handler in logger.handlers:
                if found is not None or not getattr(handler, "_instanas", False):
                    return None
                found = handler
            logger = logger.parent if logger.propagate else None
        if found is None or found.filters or found.level > logging.INFO or type(found.formatter) is not JsonFormatter:
            return None
        return found


def internal_error(scope):
    """The 500 answered for a request whose handler failed before it began its response."""
    from service.errors import error_response  # late: errors imports FastAPI

    message = "the server failed to handle this request; see its log"
    if scope.get("path", "").startswith("/v2"):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": message}, status_code=500)
    return error_response(500, "internal_error", message)
