"""Schema rules every table keeps: explicit ON DELETE, indexed foreign keys, aware timestamps."""

from __future__ import annotations

from sqlalchemy import DateTime

from powerbank.storage.models import Base
from powerbank.storage.types import UTCDateTime


def _indexed_leading_columns(table) -> set[str]:
    leading = {index.columns[0].name for index in table.indexes if len(index.columns)}
    for constraint in table.constraints:
        columns = getattr(constraint, "columns", None)
        if columns is not None and len(columns) and constraint.__class__.__name__ in ("UniqueConstraint", "PrimaryKeyConstraint"):
            leading.add(list(columns)[0].name)
    leading |= {column.name for column in table.columns if column.unique or column.index}
    return leading


def test_every_foreign_key_says_what_happens_on_delete():
    missing = [
        f"{table.name}.{fk.parent.name}"
        for table in Base.metadata.tables.values()
        for fk in table.foreign_keys
        if fk.ondelete is None
    ]
    assert missing == []


def test_every_foreign_key_column_is_indexed():
    foreign_keys = [fk for table in Base.metadata.tables.values() for fk in table.foreign_keys]
    assert len(foreign_keys) > 15
    unindexed = [
        f"{table.name}.{fk.parent.name}"
        for table in Base.metadata.tables.values()
        for fk in table.foreign_keys
        if fk.parent.name not in _indexed_leading_columns(table)
    ]
    assert unindexed == []


def test_every_timestamp_is_timezone_aware_utc():
    naive = [
        f"{table.name}.{column.name}"
        for table in Base.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, DateTime) or (isinstance(column.type, UTCDateTime) and not column.type.impl.timezone)
    ]
    assert naive == []
