"""rentals paid by card: payment mode and the card hold's intent

Revision ID: 0004_rental_card_payment
Revises: 0003_promotions
Create Date: 2026-11-23 07:40:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004_rental_card_payment'
down_revision: Union[str, Sequence[str], None] = '0003_promotions'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Existing rentals were all paid from the wallet: the server default says so."""
    with op.batch_alter_table('rentals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('payment_mode', sa.String(length=8), server_default='wallet', nullable=False))
        batch_op.add_column(sa.Column('card_intent_id', sa.Uuid(), nullable=True))
        batch_op.create_check_constraint(batch_op.f('ck_rentals_payment_mode_valid'), "payment_mode IN ('wallet', 'card')")
        batch_op.create_check_constraint(batch_op.f('ck_rentals_card_intent_only_for_card'),
                                         "payment_mode = 'card' OR card_intent_id IS NULL")
        batch_op.create_foreign_key(batch_op.f('fk_rentals_card_intent_id_payment_intents'), 'payment_intents',
                                    ['card_intent_id'], ['id'], ondelete='RESTRICT')
        batch_op.create_index(batch_op.f('ix_rentals_card_intent_id'), ['card_intent_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rentals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rentals_card_intent_id'))
        batch_op.drop_constraint(batch_op.f('fk_rentals_card_intent_id_payment_intents'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('ck_rentals_card_intent_only_for_card'), type_='check')
        batch_op.drop_constraint(batch_op.f('ck_rentals_payment_mode_valid'), type_='check')
        batch_op.drop_column('card_intent_id')
        batch_op.drop_column('payment_mode')
