"""Alembic migrations of the audit database, installed as ``fsguard.migrations``."""
