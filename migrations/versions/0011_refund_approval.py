"""refund approval: refunds above a threshold wait as `requested` for an admin, who approves or
rejects them (issue 6)

Revision ID: 0011_refund_approval
Revises: 0010_system_logs
Create Date: 2026-11-23 09:00:00

Downgrade deletes `requested` and `rejected` refunds: they never reserved money or reached the
provider (no ledger transfer, no provider id), so nothing else points at them.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0011_refund_approval'
down_revision: Union[str, Sequence[str], None] = '0010_system_logs'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NEW_STATUSES = "status IN ('requested', 'pending', 'succeeded', 'failed', 'rejected')"
OLD_STATUSES = "status IN ('pending', 'succeeded', 'failed')"


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reviewed_by', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('rejection_reason', sa.String(length=300), nullable=True))
        batch_op.drop_constraint(batch_op.f('ck_refunds_status_valid'), type_='check')
        batch_op.create_check_constraint(batch_op.f('ck_refunds_status_valid'), NEW_STATUSES)
        batch_op.create_index(batch_op.f('ix_refunds_reviewed_by'), ['reviewed_by'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_refunds_reviewed_by_users'), 'users', ['reviewed_by'], ['id'],
                                    ondelete='SET NULL')


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DELETE FROM refunds WHERE status IN ('requested', 'rejected')")
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_refunds_reviewed_by_users'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_refunds_reviewed_by'))
        batch_op.drop_constraint(batch_op.f('ck_refunds_status_valid'), type_='check')
        batch_op.create_check_constraint(batch_op.f('ck_refunds_status_valid'), OLD_STATUSES)
        batch_op.drop_column('rejection_reason')
        batch_op.drop_column('reviewed_at')
        batch_op.drop_column('reviewed_by')
