"""The bridge's directory databases: the backend interface, migrations, SQLite and PostgreSQL.

`relay_bridge.db.backend.open_directory` picks the backend from `[storage] database`: a file
path is SQLite (the embedded default), a `postgresql://` URL is PostgreSQL (psycopg 3, loaded
only then). See docs/architecture.md, "The directory's backends".
"""
