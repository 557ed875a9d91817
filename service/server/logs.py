"""Log lines: JSON objects or text, for the service's loggers and uvicorn's (ENCODER_LOG_FORMAT)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Not fields of a line: a record's own attributes, and uvicorn's colored copy of the message.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def json_errors() -> bool:
    """Whether a server's errors from before its logging is set up are JSON lines: by
    ENCODER_LOG_FORMAT, read raw (it may be the setting that is wrong), json unless it says text."""
    return os.environ.get("ENCODER_LOG_FORMAT", "json").strip().lower() != "text"


def say_error(message: str, as_json: bool) -> None:
    """One line on stderr: `encoding-service: ...`, or a JSON log line like the server's own."""
    if as_json:
        record = logging.makeLogRecord({"name": "service.cli", "levelname": "ERROR", "levelno": 40, "msg": message})
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"encoding-service: {message}", file=sys.stderr)


def configure_logging(level: str, log_format: str = "json") -> None:
    """The service's own loggers on stdout, once per process, as JSON lines or text (the access
    log writes its own lines: RequestLog)."""
    logger = logging.getLogger("service")
    logger.setLevel(level.upper() if level != "trace" else "DEBUG")
    for handler in [h for h in logger.handlers if getattr(h, "_service", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler._service = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """uvicorn's logging config, for `encoding-service serve`: its own lines (startup, errors,
    shutdown), and anything else logged through the root logger, as JSON lines on stderr, or as
    uvicorn writes them by default. uvicorn applies ENCODER_LOG_LEVEL on top."""
    if log_format == "json":
        formatter: dict[str, Any] = {"()": JsonFormatter}
    else:
        formatter = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
