"""SQLAlchemy 2 models and data access: PostgreSQL through asyncpg, SQLite as the embedded default."""
