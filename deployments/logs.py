"""One line, not a traceback, for a request the fleet refused on purpose.

Serve's replica logs every exception a handle call raises as "Request failed." with its
traceback at ERROR. A model server or the controller raising `ApiError` (a context
overflow, a full budget) is an answer, not a failure: its record becomes one line at
WARNING, or INFO for the commonest client mistakes. 5xx and everything else keep theirs.
"""

from __future__ import annotations

import logging

from policies.errors import find_api_error
from policies.logs import SERVE_LOGGER


class RefusalsInOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        refusal = find_api_error(error) if error is not None else None
        if refusal is None or refusal.status >= 500:
            return True
        record.levelno = logging.INFO if refusal.status in (400, 404) else logging.WARNING
        record.levelname = logging.getLevelName(record.levelno)
        record.msg, record.args = "request refused: %s", (refusal.summary(),)
        record.exc_info, record.exc_text = None, None
        return True


def refusals_in_one_line() -> None:
    """Installs the filter on Serve's logger, which logs the failed calls, once per process."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, RefusalsInOneLine) for f in logger.filters):
        logger.addFilter(RefusalsInOneLine())
