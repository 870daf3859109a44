"""Docs come from the code: README's settings table is generated from SETTINGS."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_settings_doc", ROOT / "scripts" / "build_settings_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_current():
    builder = load_builder()
    readme = (ROOT / "README.rst").read_text()
    assert builder.START in readme and builder.END in readme
    assert builder.updated(readme) == readme, "run: .venv/bin/python scripts/build_settings_doc.py"


def test_readme_has_exactly_the_two_setup_commands_and_ci_uses_the_test_one():
    readme = (ROOT / "README.rst").read_text()
    assert readme.count("    ./dev.sh run\n") == 1 and readme.count("    ./dev.sh test\n") == 1
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()


def test_readme_rule_table_is_the_one_in_policy():
    assert load_builder().rule_table() in (ROOT / "README.rst").read_text()


def test_readme_is_valid_restructuredtext():
    import docutils.core

    docutils.core.publish_string((ROOT / "README.rst").read_text(), writer="null",
                                 settings_overrides={"report_level": 2, "halt_level": 2})
