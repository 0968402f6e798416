"""system_logs: WARNING+ records of the powerbank loggers for admins (issue 6)

Revision ID: 0010_system_logs
Revises: 0009_notifications
Create Date: 2026-11-23 08:48:19.043770

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0010_system_logs'
down_revision: Union[str, Sequence[str], None] = '0009_notifications'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('system_logs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('level', sa.String(length=8), nullable=False),
    sa.Column('logger', sa.String(length=100), nullable=False),
    sa.Column('message', sa.String(length=2000), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("level IN ('WARNING', 'ERROR', 'CRITICAL')", name=op.f('ck_system_logs_level_valid')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_system_logs'))
    )
    with op.batch_alter_table('system_logs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_system_logs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_system_logs_level_created_at'), ['level', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_system_logs_logger_created_at'), ['logger', 'created_at'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('system_logs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_system_logs_logger_created_at'))
        batch_op.drop_index(batch_op.f('ix_system_logs_level_created_at'))
        batch_op.drop_index(batch_op.f('ix_system_logs_created_at'))

    op.drop_table('system_logs')
