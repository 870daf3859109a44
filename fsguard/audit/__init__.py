"""The audit trail: every decision in a database (SQLite by default, PostgreSQL in production).

``models`` (the table and the record), ``store`` (engines, migrations,
schema check), ``writer`` and ``spool`` (the bounded queue, the batching
writer greenlet and its durable fallback), ``queries`` and ``cli``
(``fsguard db`` and ``fsguard audit``).

The names below are loaded on first use, so that importing the CLI does not
import SQLAlchemy before gevent has patched the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import AuditRecord
    from .store import AuditError, DatabaseUnavailable, SchemaBehind, SchemaUnknown, check_schema
    from .writer import AuditWriter

_EXPORTS = {
    "AuditRecord": "models",
    "AuditWriter": "writer",
    "AuditError": "store",
    "DatabaseUnavailable": "store",
    "SchemaBehind": "store",
    "SchemaUnknown": "store",
    "check_schema": "store",
}

__all__ = [
    "AuditError",
    "AuditRecord",
    "AuditWriter",
    "DatabaseUnavailable",
    "SchemaBehind",
    "SchemaUnknown",
    "check_schema",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
