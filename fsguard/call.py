"""What fsguard knows about a call: facts read from FreeSWITCH's channel data.

The captures are the reference for every variable used here:

* digest-authenticated means ``variable_sip_auth_username`` is present; the
  identity is ``sip_auth_username@sip_auth_realm`` (the realm is the tenant's
  domain with FusionPBX's ``challenge-realm=auto_to``);
* ``variable_sip_authorized`` alone proves nothing: ACL-trusted trunks carry
  it too, together with ``variable_sip_acl_authed_by``;
* the caller's address is ``variable_sip_network_ip`` / ``_port``.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def in_networks(address: IPAddress | None, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` (None: not an IP) lies in one of ``networks``."""
    return address is not None and any(address in network for network in networks)


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress | None:
    """Normalise an IP as FreeSWITCH may print it; None if it is not an IP.

    Accepts ``[v6]`` brackets and IPv4-mapped IPv6 (``::ffff:192.0.2.1`` is
    the IPv4 address), so every text form of one address compares equal.
    Cached (bounded): a decision parses the same few addresses ~7 times and
    ``ipaddress`` was a tenth of its CPU; the results are immutable.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class CallFacts:
    """The facts of one INVITE that the verdict may use."""

    uuid: str
    source_ip: str
    source_port: str = ""
    auth_user: str = ""
    auth_realm: str = ""
    acl_authed_by: str = ""
    destination: str = ""
    from_user: str = ""
    from_host: str = ""
    domain: str = ""
    profile: str = ""
    user_agent: str = ""
    call_direction: str = ""
    context: str = ""
    switch_hostname: str = ""
    core_uuid: str = ""
    socket_mode: str = ""
    user_exists: str = ""  # FusionPBX's user_exists (destination is a local user), if set
    proxy_client_ip: str = ""  # the trusted proxy's client-address header, if any
    aliases: tuple[str, ...] = ()  # number_alias / sip_number_alias of the authenticated user

    @property
    def has_credentials(self) -> bool:
        return bool(self.auth_user)

    @property
    def identity(self) -> str:
        """``user@domain``, the key of registrations (tenants reuse numbers)."""
        return f"{self.auth_user}@{self.auth_realm}".lower() if self.auth_user else ""

    @property
    def source_address(self) -> IPAddress | None:
        return parse_ip(self.source_ip)


# channel-data header -> CallFacts field; the first header present wins.
_SOURCES: dict[str, tuple[str, ...]] = {
    "uuid": ("Unique-ID", "variable_uuid", "Channel-Call-UUID"),
    "source_ip": ("variable_sip_network_ip", "Caller-Network-Addr", "variable_sip_received_ip"),
    "source_port": ("variable_sip_network_port", "variable_sip_received_port"),
    "auth_user": ("variable_sip_auth_username",),
    "auth_realm": ("variable_sip_auth_realm",),
    "acl_authed_by": ("variable_sip_acl_authed_by",),
    "destination": ("Caller-Destination-Number", "variable_destination_number"),
    "from_user": ("variable_sip_from_user",),
    "from_host": ("variable_sip_from_host",),
    "domain": ("variable_domain_name", "variable_sip_auth_realm"),
    "profile": ("variable_sofia_profile_name",),
    "user_agent": ("variable_sip_user_agent",),
    "call_direction": ("variable_call_direction",),
    "context": ("Caller-Context",),
    "switch_hostname": ("FreeSWITCH-Hostname",),
    "core_uuid": ("Core-UUID",),
    "socket_mode": ("Socket-Mode",),
    "user_exists": ("variable_user_exists",),
}
_ALIASES = ("variable_number_alias", "variable_sip_number_alias")
DEFAULT_PROXY_HEADER = "X-AUTH-IP"


def facts_from_channel_data(headers: dict[str, str], proxy_header: str = DEFAULT_PROXY_HEADER) -> CallFacts:
    """Build CallFacts from decoded channel-data headers (the ``connect`` reply).

    A SIP header ``X-Foo`` of the INVITE appears as ``variable_sip_h_X-Foo``
    (FreeSWITCH's convention); ``proxy_header`` names the one a trusted proxy
    sets to the real client address.
    """
    values: dict[str, object] = {}
    for name, candidates in _SOURCES.items():
        for header in candidates:
            value = headers.get(header)
            if value:
                values[name] = value
                break
    values.setdefault("uuid", "")  # missing: the caller refuses such channel data
    values.setdefault("source_ip", "")
    values["proxy_client_ip"] = headers.get(f"variable_sip_h_{proxy_header}", "").strip()
    values["aliases"] = tuple(dict.fromkeys(a for a in (headers.get(h, "") for h in _ALIASES) if a))
    return CallFacts(**values)
