"""The service runs without torch: importing and building the app must not load it."""

from __future__ import annotations

import subprocess
import sys


def test_service_never_imports_torch(smoke_bundle):
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "import service.cli\n"
        f"create_app(Settings(model={str(smoke_bundle)!r}))\n"
        "assert 'torch' not in sys.modules, 'service imported torch'\n"
        "assert 'training' not in sys.modules, 'service imported the training package'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
