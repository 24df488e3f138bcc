"""indexes for list sorting

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

PRIORITY_RANK = "CASE priority WHEN 'low' THEN 1 WHEN 'medium' THEN 2 WHEN 'high' THEN 3 ELSE 0 END"


def upgrade():
    op.create_index('ix_tasks_user_updated', 'tasks', ['user_id', 'updated_at', 'id'])
    op.create_index('ix_tasks_user_due', 'tasks', ['user_id', 'due_date', 'id'])
    op.create_index('ix_tasks_user_title', 'tasks', ['user_id', sa.text('lower(title)'), 'id'])
    op.create_index('ix_tasks_user_priority', 'tasks', ['user_id', sa.text(f'({PRIORITY_RANK})'), 'id'])


def downgrade():
    op.drop_index('ix_tasks_user_priority', table_name='tasks')
    op.drop_index('ix_tasks_user_title', table_name='tasks')
    op.drop_index('ix_tasks_user_due', table_name='tasks')
    op.drop_index('ix_tasks_user_updated', table_name='tasks')
