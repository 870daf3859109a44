"""The decision table: one row per call fsguard decided.

Revision ID: 685f1c5d6971
Revises:
Create Date: 2026-11-22 19:17:35.369054
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "685f1c5d6971"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_decision_at": ["at"],
    "ix_decision_client_ip_at": ["client_ip", "at"],
    "ix_decision_source_ip_at": ["source_ip", "at"],
    "ix_decision_auth_user_auth_realm_at": ["auth_user", "auth_realm", "at"],
    "ix_decision_domain_at": ["domain", "at"],
    "ix_decision_destination_at": ["destination", "at"],
    "ix_decision_verdict_at": ["verdict", "at"],
    "ix_decision_reason_at": ["reason", "at"],
    "ix_decision_call_uuid": ["call_uuid"],
}


def upgrade() -> None:
    op.create_table(
        "decision",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.Uuid(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("call_uuid", sa.String(length=64), nullable=False),
        sa.Column("switch", sa.String(length=64), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("auth_user", sa.String(length=128), nullable=False),
        sa.Column("auth_realm", sa.String(length=255), nullable=False),
        sa.Column("from_user", sa.String(length=128), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("client_ip", sa.String(length=64), nullable=False),
        sa.Column("source_ip", sa.String(length=64), nullable=False),
        sa.Column("source_port", sa.Integer(), nullable=True),
        sa.Column("registered_ips", sa.Text(), nullable=False),
        sa.Column("user_agent", sa.String(length=255), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=32), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("lookup", sa.String(length=16), nullable=False),
        sa.Column("latency_us", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.CheckConstraint("verdict IN ('allow', 'deny')", name=op.f("ck_decision_verdict")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decision")),
        sa.UniqueConstraint("record_id", name=op.f("uq_decision_record_id")),
    )
    for name, columns in INDEXES.items():
        op.create_index(op.f(name), "decision", columns)


def downgrade() -> None:
    for name in reversed(INDEXES):
        op.drop_index(op.f(name), table_name="decision")
    op.drop_table("decision")
