"""The audit log of admin actions, append-only, and room for longer actor names in events.

``audit_log`` names studies by UID (no foreign key), so a purge keeps their entries. Triggers
refuse every UPDATE and DELETE of it (and TRUNCATE on PostgreSQL); a later migration that
rebuilds the table on SQLite (batch mode) must create its triggers again. ``events.actor``
grows from 64 to 255 characters: ``web:`` and a 64-character user, or ``cli:user@host`` with a
fully qualified host name, did not fit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 11:48:13.660468
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
    ],
}
DROP_APPEND_ONLY = {
    "sqlite": ["DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete"],
    "postgresql": ["DROP TRIGGER audit_log_append_only ON audit_log", "DROP FUNCTION audit_log_append_only()"],
}


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_study_instance_uid'), ['study_instance_uid'], unique=False)
    for statement in APPEND_ONLY[op.get_context().dialect.name]:
        op.execute(statement)

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.alter_column('actor',
               existing_type=sa.String(length=64),
               type_=sa.String(length=255),
               existing_nullable=False)



def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.alter_column('actor',
               existing_type=sa.String(length=255),
               type_=sa.String(length=64),
               existing_nullable=False)

    for statement in DROP_APPEND_ONLY[op.get_context().dialect.name]:
        op.execute(statement)
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
