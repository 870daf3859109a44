"""Test support: FreeSWITCH simulators built from captured ESL transcripts.

* :mod:`fsguard.testing.transcripts` - the captures in ``fixtures/freeswitch``
  (``FIXTURES``, ``load``) and FreeSWITCH's wire encodings.
* :mod:`fsguard.testing.caller` - FreeSWITCH's outbound role: ``place_call``
  connects to the app like the ``socket`` dialplan application.
* :mod:`fsguard.testing.switch` - FreeSWITCH's inbound role: ``FakeSwitch``,
  the event socket on port 8021 with a registration table.

Nothing here is imported by the daemon; the submodules need gevent.
"""
