"""The mirror's database: one way to open it (db), the canonical, history and staging tables
(tables), the state of every sync and publish (bookkeeping: every query of those tables),
issues, the locked schemas (schema, schema_registry), locks, dead letters, where a mirror lives
(mirror), and what keeps it bounded (archive_retention, staging_retention, maintenance)."""
