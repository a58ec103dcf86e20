"""The adapter registry: validated, content-addressed, versioned LoRA adapters with aliases.

Modules, one job each:
- ``registry``: the API (push, promote, rollback, delete, list, show, resolve) and
  ``open_registry(settings)``; ``open_accounts(settings)``.
- ``catalog``: every read and write of the metadata (versions, aliases, history, evals) in SQL.
- ``accounts``: every read and write of tenants, API keys and usage in SQL.
- ``models``: the plain records the catalog and accounts return, each built from its table's row.
- ``tables``: the table declarations (SQLAlchemy Core), the same on SQLite and PostgreSQL.
- ``database``: engine setup, SQLite/PostgreSQL locking, retried write and read transactions.
- ``validate``: checks of a PEFT adapter folder against the base model.
- ``basedims``: the base model's layer shapes that adapters must fit.
- ``tensorfile``: bounded parsing of safetensors headers and values.
- ``blobs``: content-addressed file storage (a local folder, or S3 through ``s3``).
- ``blob_cache``: the local LRU cache of adapter folders fetched from the blob store.
- ``cli``: ``loraplex adapters ...``.
- ``accounts_cli``: ``loraplex tenants ...``, ``loraplex keys ...``, ``loraplex usage``.
"""
