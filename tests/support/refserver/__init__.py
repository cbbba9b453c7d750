"""The reference Resource API (docs/formats.md) for tests, demos and benchmarks.

``python3 -m tests.support.refserver`` runs it from the command line; ``RefServer`` runs it in-process. The
``/_control/`` endpoints and switch methods exist for tests and demos only.
"""

from tests.support.refserver.cli import main
from tests.support.refserver.server import RefServer
from tests.support.refserver.state import ROLES, UPLOAD_ROLES, ApiError, User

__all__ = ["ROLES", "UPLOAD_ROLES", "ApiError", "RefServer", "User", "main"]
