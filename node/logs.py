"""Logging set-up shared by every process of the node."""

import logging


def configure_logging(level: str) -> None:
    """Plain, timestamped log lines; pynetdicom's chatter (which may echo headers) kept at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
