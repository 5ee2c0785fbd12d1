"""Secrets from the environment: a variable holding the secret, or another naming a file with it.

The file form lets a container mount a secret instead of putting it in its environment. Both the
edge module (its admin key) and the deployment target (the same key, a registry password) read
secrets this one way.
"""

from __future__ import annotations

import os
from pathlib import Path

# The edge module's admin key: read by the module, and by the deployment target that calls it.
ADMIN_KEY_ENV = "TURBOFAN_EDGE_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "TURBOFAN_EDGE_ADMIN_KEY_FILE"


def secret_from_env(variable: str, file_variable: str) -> str | None:
    """The value of `variable`, else the content of the file `file_variable` names, else None.

    A named file that is missing raises: a misconfiguration must not pass as "no secret"."""
    value = os.environ.get(variable, "").strip()
    path = os.environ.get(file_variable, "").strip()
    if not value and path:
        value = Path(path).read_text(encoding="utf-8").strip()
    return value or None
