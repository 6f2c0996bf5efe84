"""The database layer: models (the schema) and migrations."""
