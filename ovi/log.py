"""The engine's logger: every record carries the ``[Ovi]`` prefix, whoever formats it (ComfyUI, the CLI)."""

from __future__ import annotations

import logging


class _Prefix(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("[Ovi]"):
            record.msg = f"[Ovi] {record.msg}"
        return True


log = logging.getLogger("ovi")
if not any(isinstance(f, _Prefix) for f in log.filters):
    log.addFilter(_Prefix())
