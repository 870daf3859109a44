"""fsguard: refuse credentialed SIP calls from IPs the extension has not registered."""

__version__ = "0.1.0"
