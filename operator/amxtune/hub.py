"""Does a base model named by its hub id exist? Asked before any worker pod is created.

A typo in `spec.model.name` would otherwise cost a scheduled set of AMX pods that fail at their
first download. The operator asks the hub's model API without credentials (Secret values never
reach the operator), so only definite answers block a job: a repository or revision that the
hub says does not exist. Private or gated models, hosts without egress, and any other answer
let the job start; the trainer then reports what it finds.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request

from amxtune_api.training import BUILTIN_MODELS

log = logging.getLogger(__name__)


def check_model(
    endpoint: str,
    name: str,
    revision: str | None,
    has_token: bool,
    timeout: float = 3.0,
) -> tuple[str, str] | None:
    """(reason, message) when the hub at `endpoint` definitely has no such model or revision."""
    if not endpoint or name in BUILTIN_MODELS:
        return None
    url = (
        f"{endpoint.rstrip('/')}/api/models/{urllib.parse.quote(name, safe='/')}"
        f"/revision/{urllib.parse.quote(revision or 'main', safe='')}"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        code = error.headers.get("X-Error-Code", "")
        status = error.code
    except (OSError, ValueError) as error:  # no route, DNS, timeout, TLS: cannot tell
        log.info("could not ask %s about model %s (%s); the trainer will check it",
                 endpoint, name, error)
        return None
    if code == "RevisionNotFound":
        return "ModelRevisionNotFound", (
            f"spec.model.revision: the hub has no revision {revision or 'main'!r} of {name!r}"
        )
    # Without credentials the hub answers 401 for private repositories too: only say
    # "not found" when no token was given, because then the trainer could not read it either.
    # Mirrors that lack the model API answer without an error code: no verdict then.
    if code == "RepoNotFound" and not (has_token and status == 401):
        return "ModelNotFound", (
            f"spec.model.name: the hub has no model {name!r} (check the id; for a private or "
            "gated model set spec.model.tokenSecretRef)"
        )
    return None
