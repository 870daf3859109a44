"""The migrations ship inside the installed package and run from there (not from the checkout)."""

import configparser
import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = {"fsguard.migrations", "fsguard.migrations.versions"}


def test_setup_cfg_lists_every_package_and_the_migrations():
    """setup.cfg lists packages by hand (for the migrations' mapping): none may be forgotten."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    assert listed == set(find_packages(str(ROOT), include=["fsguard", "fsguard.*"])) | MIGRATIONS
    assert config["options"]["package_dir"].split() == ["fsguard.migrations", "=", "migrations"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (the checkout itself is left untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "var"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("fsguard-*.whl")
    return built


def test_wheel_holds_the_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = {f"fsguard/migrations/versions/{p.name}" for p in (ROOT / "migrations" / "versions").glob("*.py")}
    assert {"fsguard/migrations/env.py", "fsguard/migrations/script.py.mako"} | versions <= names
    assert not any(name.startswith("migrations/") for name in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: alembic" in metadata


def test_installed_wheel_migrates_a_database(wheel, tmp_path):
    """Installed (not editable) in a throw-away venv, run from elsewhere: fsguard db upgrade works."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    zipfile.ZipFile(wheel).extractall(purelib)
    # The dependencies from the development venv (its .pth files, the editable fsguard among them, are not read).
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import json, fsguard; from fsguard.audit.store import migrations_path; "
             "print(json.dumps([fsguard.__file__, str(migrations_path())]))")
    package, migrations = json.loads(subprocess.check_output([python, "-c", probe], cwd=tmp_path, text=True))
    assert Path(package).is_relative_to(env) and Path(migrations).is_relative_to(env), (package, migrations)

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    for command, expected in ((["db", "upgrade"], "upgraded from empty to"), (["db", "current"], "(head)")):
        result = subprocess.run([python, "-m", "fsguard", *command, "--url", url], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout
