"""the last good JWKS, shared by every worker and instance

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

A worker that starts (or is recycled) during an auth-server outage reads the keys from here instead of answering
503 to valid tokens. One row per JWKS URL; fetched_at is the database's now() at the write.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'jwks_documents',
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('document', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('fetched_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('url', name=op.f('pk_jwks_documents')),
    )


def downgrade() -> None:
    op.drop_table('jwks_documents')
