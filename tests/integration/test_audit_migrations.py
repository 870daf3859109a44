"""The audit schema: migrations up from empty and down to base, no drift, the daemon's schema check.

On SQLite and on the real PostgreSQL.
"""

import subprocess
import sys

import alembic.command
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from fsguard.audit import DatabaseUnavailable, SchemaBehind, check_schema
from fsguard.audit.models import Base
from fsguard.audit.store import SchemaUnknown, alembic_config, connect, current_revision, head_revision
from fsguard.cli import main

pytest.register_assert_rewrite("tests.audit_conftest")  # shared fixtures and helpers, before importing it
pytest_plugins = ["tests.audit_conftest"]
from tests.audit_conftest import closed_port, upgrade  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("postgres").create_database().render_as_string(hide_password=False)


def tables(url):
    with connect(url) as connection:
        return set(sa.inspect(connection).get_table_names())


def test_upgrade_from_empty_to_head_and_down_to_base(empty_url):
    upgrade(empty_url)
    assert {"decision", "alembic_version"} <= tables(empty_url)
    with connect(empty_url) as connection:
        assert current_revision(connection) == head_revision()
        inspector = sa.inspect(connection)
        indexes = {ix["name"] for ix in inspector.get_indexes("decision")}
        unique = {uq["name"] for uq in inspector.get_unique_constraints("decision")}
        columns = {c["name"]: c for c in inspector.get_columns("decision")}
    assert {"ix_decision_at", "ix_decision_source_ip_at", "ix_decision_auth_user_auth_realm_at",
            "ix_decision_domain_at", "ix_decision_destination_at", "ix_decision_verdict_at",
            "ix_decision_reason_at", "ix_decision_call_uuid"} <= indexes
    assert "uq_decision_record_id" in unique
    assert set(columns) == set(Base.metadata.tables["decision"].columns.keys())
    if make_url(empty_url).get_backend_name() == "postgresql":
        assert columns["at"]["type"].timezone is True
    with connect(empty_url) as connection:
        alembic.command.downgrade(alembic_config(connection), "base")
        connection.commit()
        assert current_revision(connection) is None
    assert "decision" not in tables(empty_url)


def test_models_and_migrations_do_not_drift(db_url):
    """`alembic check`: autogenerate against a database at head finds nothing to do."""
    with connect(db_url) as connection:
        alembic.command.check(alembic_config(connection))


def test_check_schema_passes_at_head(db_url):
    check_schema(db_url)


def test_check_schema_on_an_empty_database_names_the_command(empty_url):
    with pytest.raises(SchemaBehind, match=r"(is at revision none \(empty\)|does not exist), head is \w+: "
                                           r"run `fsguard db upgrade --config /etc/fsguard/x.toml`"):
        check_schema(empty_url, config_path="/etc/fsguard/x.toml", create_sqlite=False)


def test_check_schema_on_a_revision_it_does_not_know(postgres):
    """Migrated by a newer fsguard: not "behind", and upgrading would not help."""
    url = postgres.create_database()
    upgrade(url)
    with connect(url) as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'feedc0ffee00'"))
        connection.commit()
    with pytest.raises(SchemaUnknown, match="feedc0ffee00, which this fsguard does not know"):
        check_schema(url)


def test_check_schema_creates_a_new_sqlite_database(tmp_path):
    """Zero setup: the default store needs no command before the first start."""
    path = tmp_path / "var" / "lib" / "fsguard" / "audit.db"
    check_schema(f"sqlite:///{path}")
    assert path.is_file()
    check_schema(f"sqlite:///{path}")


def test_check_schema_may_be_told_not_to_create_sqlite(tmp_path):
    path = tmp_path / "nowhere" / "audit.db"
    with pytest.raises(SchemaBehind, match="does not exist.*fsguard db upgrade"):
        check_schema(f"sqlite:///{path}", create_sqlite=False)
    assert not path.exists()


def test_check_schema_never_upgrades_an_existing_sqlite_database(tmp_path):
    path = tmp_path / "audit.db"
    with connect(f"sqlite:///{path}") as connection:
        connection.execute(sa.text("CREATE TABLE unrelated (x INTEGER)"))
        connection.commit()
    with pytest.raises(SchemaBehind, match="is at revision none"):
        check_schema(f"sqlite:///{path}")


def test_check_schema_unreachable_hides_the_password():
    url = f"postgresql+psycopg://fsguard:s3cret-pw@127.0.0.1:{closed_port()}/audit"
    with pytest.raises(DatabaseUnavailable) as raised:
        check_schema(url)
    message = str(raised.value)
    assert "s3cret-pw" not in message and "***" in message and "cannot connect" in message


def test_check_schema_hides_the_password_when_behind(postgres):
    url = postgres.create_database().set(password="s3cret-pw")  # trust auth: any password connects
    with pytest.raises(SchemaBehind) as raised:
        check_schema(url)
    assert "s3cret-pw" not in str(raised.value) and "***" in str(raised.value)


def test_db_commands(empty_url, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["db", "current", "--url", empty_url])
    assert result.exit_code == 0, result.output
    assert "empty (behind: head is" in result.output and "fsguard db upgrade" in result.output

    result = runner.invoke(main, ["db", "upgrade", "--url", empty_url])
    assert result.exit_code == 0, result.output
    assert f"upgraded from empty to {head_revision()}" in result.output
    result = runner.invoke(main, ["db", "upgrade", "--url", empty_url])
    assert f"already at {head_revision()}" in result.output
    result = runner.invoke(main, ["db", "current", "--url", empty_url])
    assert f"{head_revision()} (head)" in result.output

    result = runner.invoke(main, ["db", "downgrade", "--url", empty_url, "base"])
    assert result.exit_code == 0, result.output
    assert "now at base (empty)" in result.output
    assert "decision" not in tables(empty_url)

    result = runner.invoke(main, ["db", "upgrade", "--url", empty_url, "nosuchrevision"])
    assert result.exit_code == 1 and "nosuchrevision" in result.output


def test_db_upgrade_reads_the_config_and_creates_the_sqlite_directory(tmp_path):
    path = tmp_path / "var" / "lib" / "audit.db"
    config = tmp_path / "fsguard.toml"
    config.write_text(f'[[switch]]\nname = "fs1"\npassword = "x"\n[audit]\nurl = "sqlite:///{path}"\n')
    result = subprocess.run([sys.executable, "-m", "fsguard", "db", "upgrade", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check_schema(f"sqlite:///{path}")


def test_db_commands_exit_69_when_unreachable_and_78_on_bad_config(tmp_path):
    runner = CliRunner()
    url = f"postgresql+psycopg://fsguard:s3cret-pw@127.0.0.1:{closed_port()}/audit"
    result = runner.invoke(main, ["db", "upgrade", "--url", url])
    assert result.exit_code == 69
    assert "s3cret-pw" not in result.output and "cannot connect" in result.output
    config = tmp_path / "bad.toml"
    config.write_text('[audit]\nurl = "mysql://x"\n')
    result = runner.invoke(main, ["db", "current", "--config", str(config)])
    assert result.exit_code == 78 and "configuration error" in result.output
