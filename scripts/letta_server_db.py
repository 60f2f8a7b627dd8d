"""Postgres for the development Letta server, run by the server's own venv.

Usage: python letta_server_db.py start DATA_DIR
       python letta_server_db.py stop DATA_DIR

`start` starts Postgres (pgvector included) from the pgserver wheel, and on the
first start creates Letta's schema: the wheel ships no migrations, so the ORM's
metadata is created directly, plus the message sequence agent creation needs.
"""
import os
import sys
from pathlib import Path


def start(data_dir: Path) -> None:
    import pgserver

    server = pgserver.get_server(str(data_dir), cleanup_mode=None)
    # asyncpg (used by the server) needs the user and a host in the URI to pick the socket dir.
    uri = f"postgresql://postgres@localhost/postgres?host={data_dir}"
    marker = data_dir / ".memfuse-schema-0.16.8"
    if not marker.exists():
        # The ORM picks column types from LETTA_PG_URI, so set it before importing letta.
        os.environ["LETTA_PG_URI"] = uri
        import sqlalchemy
        from letta.orm import Base

        engine = sqlalchemy.create_engine(uri.replace("postgresql://", "postgresql+psycopg2://", 1))
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE EXTENSION IF NOT EXISTS vector"))
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE SEQUENCE IF NOT EXISTS message_seq_id"))
            conn.execute(sqlalchemy.text(
                "ALTER TABLE messages ALTER COLUMN sequence_id SET DEFAULT nextval('message_seq_id')"))
        engine.dispose()
        marker.write_text("schema created\n")


def stop(data_dir: Path) -> None:
    from pgserver._commands import pg_ctl

    if not (data_dir / "postmaster.pid").exists():
        return
    user = "pgserver" if os.geteuid() == 0 else None
    pg_ctl(["-w", "stop", "-m", "fast"], pgdata=data_dir, user=user)


if __name__ == "__main__":
    command, data = sys.argv[1], Path(sys.argv[2]).resolve()
    if command == "start":
        start(data)
    elif command == "stop":
        stop(data)
    else:
        sys.exit(f"unknown command {command!r}")
