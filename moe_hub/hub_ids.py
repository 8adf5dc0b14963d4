"""What moe-hub takes for a Hugging Face Hub repository id rather than a local path."""

from __future__ import annotations

import re

# "name" or "owner/name": word characters, '.' and '-', at most 96 each (the Hub's limit), and
# starting with a letter or digit, which no relative path written as ./x, ../x or ~/x does.
_HUB_ID = re.compile(r"^(?=[A-Za-z0-9])(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")


def is_hub_id(text: str | None, owner_required: bool = False) -> bool:
    """Whether ``text`` has the shape of a Hub repository id (``owner/name`` only when
    ``owner_required``). Shape only: whether a local path of that name exists is the caller's
    question."""
    if not text or not _HUB_ID.match(text):
        return False
    return "/" in text or not owner_required
