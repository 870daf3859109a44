import re
import subprocess
import sys
from pathlib import Path

import pytest

from fsguard.config import SETTINGS, ConfigError, load, parse
from fsguard.policy import Action, Mode

ROOT = Path(__file__).resolve().parents[2]
SWITCH = {"switch": [{"name": "fs1", "password": "ClueCon"}]}


def test_example_config_is_valid_and_documents_every_setting():
    config = load(ROOT / "fsguard.example.toml")
    assert config.listen == ("127.0.0.1", 8084)
    assert config.policy.mode is Mode.ENFORCE and config.policy.on_error is Action.DENY
    assert config.policy.emergency_numbers == {"911", "933", "112", "999", "000", "110", "119"}
    text = (ROOT / "fsguard.example.toml").read_text()
    for setting in SETTINGS:
        assert re.search(rf"^#? ?{setting.name} = ", text, re.M), f"{setting.key} missing from the example"


def test_defaults():
    config = parse(SWITCH)
    assert config.decision_timeout == 2.0 and config.switches[0].port == 8021
    assert config.audit.url.startswith("sqlite:")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"guard": {"mode": "enforc"}}, "guard.mode: must be one of enforce, observe"),
        ({"guard": {"on_error": "open"}}, "guard.on_error: must be one of deny, allow"),
        ({"guard": {"listen": "8084"}}, "guard.listen: must be HOST:PORT"),
        ({"guard": {"listen": "127.0.0.1:70000"}}, "guard.listen"),
        ({"guard": {"decision_timeout": 0}}, "guard.decision_timeout"),
        ({"guard": {"decision_timeout": "2"}}, "guard.decision_timeout"),
        ({"guard": {"decision_timeout": True}}, "guard.decision_timeout"),
        ({"guard": {"emergency_numbers": "911"}}, "guard.emergency_numbers"),
        ({"guard": {"emergency_numbers": ["911", "9x"]}}, "guard.emergency_numbers"),
        ({"guard": {"max_connections": 0}}, "guard.max_connections"),
        ({"guard": {"modee": "enforce"}}, "guard.modee: unknown setting"),
        ({"gaurd": {}}, "gaurd: unknown section"),
        ({"audit": {"url": "mysql://x"}}, "audit.url"),
        ({"audit": {"url": "::"}}, "audit.url"),
    ],
)
def test_bad_values_name_the_setting(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({**SWITCH, **raw})


@pytest.mark.parametrize(
    "switches, message",
    [
        (None, "at least one [[switch]]"),
        ([], "at least one [[switch]]"),
        ([{"password": "x"}], "switch[0].name: required"),
        ([{"name": "a"}], "switch[0].password: set exactly one"),
        ([{"name": "a", "password": "x", "password_env": "Y"}], "switch[0].password: set exactly one"),
        ([{"name": "a", "password": "x"}, {"name": "a", "password": "y"}], "'a' is used twice"),
        ([{"name": "a", "password": "x", "esl": "nowhere"}], "switch[0].esl"),
        ([{"name": "a", "password_env": "FSGUARD_TEST_UNSET_VAR"}], "FSGUARD_TEST_UNSET_VAR is not set"),
        ([{"name": "a", "password_file": "/nonexistent/pw"}], "switch[0].password_file: cannot read"),
    ],
)
def test_bad_switches(switches, message):
    raw = {} if switches is None else {"switch": switches}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(raw)


def test_password_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FSGUARD_PW", "from-env")
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    config = parse({"switch": [{"name": "a", "password_env": "FSGUARD_PW"},
                               {"name": "b", "password_file": str(secret), "esl": "[::1]:8021"}]})
    assert [s.password for s in config.switches] == ["from-env", "from-file"]
    assert config.switches[1].host == "::1"
    assert "from-env" not in repr(config)


def test_section_written_as_array_is_an_error():
    with pytest.raises(ConfigError, match=r"write \[guard\]"):
        parse({**SWITCH, "guard": [{}]})


@pytest.mark.parametrize("content, message", [("[guard\n", "not valid TOML"), (None, "cannot read config file")])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "c.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_cli_exits_78_with_the_setting_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[guard]\ndecision_timeout = -1\n[[switch]]\nname = "a"\npassword = "x"\n')
    result = subprocess.run([sys.executable, "-m", "fsguard", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "guard.decision_timeout" in result.stderr


def test_policy_settings_and_per_domain_overrides():
    from fsguard.policy import Mode, Scope

    config = parse({
        **SWITCH,
        "guard": {"scope": "offnet", "allow_cidrs": ["198.51.100.0/24"], "trusted_proxies": ["192.0.2.5"],
                  "identity_binding": True},
        "domain": {"Tenant-B.test": {"mode": "observe", "scope": "patterns", "scope_patterns": ["^00"],
                                     "allow_cidrs": ["2001:db8::/32"]}},
        "extension": {"1001@tenant-a.test": {"allow_cidrs": ["203.0.113.7"], "mode": "off"}},
    })
    policy = config.policy
    assert policy.default.scope is Scope.OFFNET and policy.default.identity_binding
    assert [str(n) for n in policy.global_allow_cidrs] == ["198.51.100.0/24"]
    assert [str(n) for n in policy.trusted_proxies] == ["192.0.2.5/32"]
    b = policy.rules_for("tenant-b.test")
    assert b.mode is Mode.OBSERVE and b.scope is Scope.PATTERNS and b.identity_binding  # inherited
    assert b.scope_patterns[0].pattern == "^00" and [str(n) for n in b.allow_cidrs] == ["2001:db8::/32"]
    assert policy.rules_for("tenant-a.test") == policy.default
    extension = policy.extensions["1001@tenant-a.test"]
    assert extension.mode is Mode.OFF and [str(n) for n in extension.allow_cidrs] == ["203.0.113.7/32"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"guard": {"allow_cidrs": ["10.0.0.0/33"]}}, "guard.allow_cidrs: '10.0.0.0/33' is not an IP network"),
        ({"guard": {"allow_cidrs": "10.0.0.0/8"}}, "guard.allow_cidrs: must be a list"),
        ({"guard": {"scope": "patterns"}}, "guard.scope_patterns: scope = \"patterns\" needs at least one pattern"),
        ({"guard": {"scope_patterns": ["("]}}, "guard.scope_patterns: '(' is not a regular expression"),
        ({"guard": {"identity_binding": "yes"}}, "guard.identity_binding: must be true or false"),
        ({"guard": {"proxy_header": "X AUTH"}}, "guard.proxy_header"),
        ({"guard": {"metrics_listen": "9184"}}, "guard.metrics_listen"),
        ({"domain": {"t.test": {"mode": "loud"}}}, 'domain."t.test".mode: must be one of enforce, observe, off'),
        ({"domain": {"t.test": {"listen": "x"}}}, 'domain."t.test".listen: unknown setting'),
        ({"domain": {"t.test": {"scope": "patterns"}}}, 'domain."t.test".scope_patterns: scope = "patterns" needs'),
        ({"domain": ["x"]}, 'domain: write [domain."NAME"] tables'),
        ({"extension": {"1001": {"mode": "off"}}}, 'extension."1001": name it USER@DOMAIN'),
        ({"extension": {"1001@t": {"scope": "all"}}}, 'extension."1001@t".scope: unknown setting'),
    ],
)
def test_bad_policy_settings_name_the_setting(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({**SWITCH, **raw})
