import pytest

from fsguard.call import facts_from_channel_data, parse_ip
from tests.helpers import capture_messages, capture_meta, outbound_captures


@pytest.mark.parametrize("name", outbound_captures())
def test_facts_match_the_captures_key_channel_data(name):
    channel = capture_messages(name, "fs>app")[0]
    key = capture_meta(name)["key_channel_data"]
    facts = facts_from_channel_data(channel.headers)

    def expected(header):
        value = key.get(header, "(absent)")
        return "" if value == "(absent)" else value

    assert facts.source_ip == expected("variable_sip_network_ip")
    assert facts.auth_user == expected("variable_sip_auth_username")
    assert facts.auth_realm == expected("variable_sip_auth_realm")
    assert facts.acl_authed_by == expected("variable_sip_acl_authed_by")
    assert facts.destination == expected("Caller-Destination-Number")
    assert facts.uuid == capture_meta(name)["session_uuid"]
    assert facts.has_credentials == bool(expected("variable_sip_auth_username"))


def test_trunk_is_authorized_but_has_no_credentials():
    channel = capture_messages("out-no-credentials-trunk", "fs>app")[0]
    assert channel.headers["variable_sip_authorized"] == "true"
    facts = facts_from_channel_data(channel.headers)
    assert not facts.has_credentials and facts.acl_authed_by == "providers" and facts.identity == ""


def test_identity_is_user_at_realm_lowercase():
    channel = capture_messages("out-tenant-b-collision", "fs>app")[0]
    assert facts_from_channel_data(channel.headers).identity == "1001@tenant-b.test"


@pytest.mark.parametrize(
    "a, b",
    [
        ("::1", "0:0:0:0:0:0:0:1"),
        ("[::1]", "::1"),
        ("2001:DB8::1", "2001:db8:0::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:c000:0201", "192.0.2.1"),
    ],
)
def test_ip_text_forms_compare_equal(a, b):
    assert parse_ip(a) == parse_ip(b) is not None


@pytest.mark.parametrize("text", ["", "1001", "999.1.1.1", "::g", "127.0.0.1:5060"])
def test_non_ips_are_none(text):
    assert parse_ip(text) is None
