"""The reference Resource API (SPEC section 5) for tests, demos and benchmarks.

``azaion-refserver`` runs it from the command line; ``RefServer`` runs it in-process. The
``/_control/`` endpoints and switch methods exist for tests and demos only.
"""

from azaiond.refserver.cli import main
from azaiond.refserver.server import RefServer
from azaiond.refserver.state import ROLES, UPLOAD_ROLES, ApiError, User

__all__ = ["ROLES", "UPLOAD_ROLES", "ApiError", "RefServer", "User", "main"]
