"""Job leases, retry backoff, the instances a job covers, and idempotent results.

A result is keyed by its input (series used + model weights), so no input is graded into two rows;
there are no results yet when this runs (grading lands with it), so the new column needs no default.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 08:55:43.402571
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_instance_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('result_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_result_id_results'), 'results', ['result_id'], ['id'], ondelete='SET NULL', use_alter=True)

    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_key', sa.String(length=64), nullable=False))
        batch_op.create_unique_constraint(batch_op.f('uq_results_study_id_input_key'), ['study_id', 'input_key'])



def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_results_study_id_input_key'), type_='unique')
        batch_op.drop_column('input_key')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_result_id_results'), type_='foreignkey')
        batch_op.drop_column('not_before')
        batch_op.drop_column('result_id')
        batch_op.drop_column('last_instance_id')

