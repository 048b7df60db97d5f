"""
C{--log-format json}: one JSON object per line, for log shippers.

Each line has C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
(the event formatted as the text log has it) and the event's own fields
(C{leg}, C{peer}, C{reason}, counts...), so a machine never parses prose.
"""

import json
import sys
from datetime import UTC, datetime

from twisted.logger import ILogObserver, formatEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer

# Keys of twisted's own bookkeeping, and of legacy events, that are not
# fields of the event.
_INTERNAL = frozenset({"message", "format", "isError", "time", "system", "failure", "why"})


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def eventAsRecord(event):
    """
    The flat dict written for C{event}.
    """
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else ("error" if event.get("isError") else "info"),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in record:
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JsonLinesObserver:
    """
    Writes each event as one line of JSON to C{outFile}.
    """

    def __init__(self, outFile):
        self.outFile = outFile

    def __call__(self, event):
        try:
            line = json.dumps(eventAsRecord(event), ensure_ascii=False)
        except Exception as e:  # never lose the event because of one field
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self.outFile.write(line + "\n")
        self.outFile.flush()


def observerFor(twistdOptions):
    """
    A JSON observer writing where twistd would write its text log: stdout
    with C{--logfile=-} or C{-n} and no log file, else the log file
    (default C{twistd.log}).
    """
    options = twistdOptions or {}
    path = options.get("logfile") or ""
    if path == "-" or (not path and options.get("nodaemon")):
        return JsonLinesObserver(sys.stdout)
    return JsonLinesObserver(LogFile.fromFullPath(path or "twistd.log"))
