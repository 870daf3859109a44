# gevent must patch the standard library before anything else imports it
# (same rule as the fsguard CLI; see tests/unit/test_gevent_import_order.py).
from gevent import monkey

monkey.patch_all()
