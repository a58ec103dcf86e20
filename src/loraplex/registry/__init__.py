"""The adapter registry: validated, content-addressed, versioned LoRA adapters with aliases.

Modules, one job each: ``refs`` (names, ``N``/``N@vK``/``N:alias``), ``tensorfile`` (bounded
safetensors parsing), ``basedims`` + ``validate`` (adapter checks), ``blobs`` + ``s3``
(content-addressed storage), ``cache`` (local LRU of fetched adapters), ``schema`` + ``db`` +
``catalog`` + ``queries`` (metadata in SQLite/PostgreSQL), ``registry`` (the API), ``factory``
(from settings), ``source`` (the server's ``AdapterSource``), ``cli`` (``loraplex adapters``).
"""
