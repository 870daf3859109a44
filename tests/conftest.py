# gevent must patch the standard library before anything else imports it
# (same rule as the fsguard CLI; see tests/unit/test_gevent_import_order.py).
from gevent import monkey

monkey.patch_all()

from hypothesis import settings  # noqa: E402

# A loaded CI machine must not turn a slow example into a failure: no per-example deadline.
settings.register_profile("fsguard", deadline=None)
settings.load_profile("fsguard")
