"""Alembic migrations; `powerbank migrate` runs them (upgrade and downgrade both work)."""
