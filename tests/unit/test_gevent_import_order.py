"""gevent must patch before anything that opens sockets or takes locks.

Same idea as gunicorn's tests/workers/test_gevent_import_order.py: in a
fresh interpreter, importing the CLI patches the standard library and does
not import the database or ESL libraries before that.
"""

import subprocess
import sys

PROBE = """
import sys
import fsguard.cli
from gevent import monkey
assert monkey.is_module_patched("socket"), "socket not patched"
assert monkey.is_module_patched("threading"), "threading not patched"
early = [m for m in ("sqlalchemy", "psycopg", "greenswitch", "fsguard.daemon") if m in sys.modules]
assert not early, f"imported before the command runs: {early}"
print("ok")
"""


def test_cli_patches_first_and_imports_heavy_modules_late():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
