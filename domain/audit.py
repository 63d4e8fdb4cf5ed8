"""Security audit lines: one for every refused authorization (PRODUCT.md section 8).

Who (user, or the client address when unauthenticated), what (the request), which session,
and why. Never a token or a secret: callers pass reasons, not credentials.
"""

from __future__ import annotations

import logging

log = logging.getLogger("parley.audit")


def refused(*, who: str | None, what: str, session: str | None, why: str, address: str | None = None) -> None:
    log.warning(
        "refused: who=%s what=%s session=%s why=%s%s",
        who if who is not None else "-", what, session or "-", why,
        f" address={address}" if address else "",
    )
