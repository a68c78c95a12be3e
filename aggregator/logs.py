"""JSON logs, one object per line: time, level, event, round id, site id, stage.

Callers pass only ids, stage numbers, counts and reasons in ``extra``; never a payload, key,
seed, share or plaintext (the fields below are the only ones copied into a line).
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("event", "round_id", "site_id", "stage", "reason", "code", "peer", "count")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__  # the type only: no payload in a trace
        return json.dumps(line, separators=(",", ":"))


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("secagg")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
