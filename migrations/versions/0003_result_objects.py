"""The DICOM objects made from each result, and the peer each delivery goes to now.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 09:17:09.746679
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('result_objects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], name=op.f('fk_result_objects_result_id_results'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_result_objects')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_result_objects_sop_instance_uid'))
    )
    with op.batch_alter_table('result_objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_objects_result_id'), ['result_id'], unique=False)

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('via', sa.String(length=128), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('via')

    with op.batch_alter_table('result_objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_objects_result_id'))

    op.drop_table('result_objects')
