"""The reference Resource API (SPEC section 5) for tests, demos and benchmarks.

``azaion-refserver`` runs it from the command line; ``RefServer`` runs it in-process. The
``/_control/`` endpoints and switch methods exist for tests and demos only.
"""

from tests.support.refserver.cli import main
from tests.support.refserver.server import RefServer
from tests.support.refserver.state import ROLES, UPLOAD_ROLES, ApiError, User

__all__ = ["ROLES", "UPLOAD_ROLES", "ApiError", "RefServer", "User", "main"]
