"""Downloads from the Hugging Face hub that fail fast and plainly when there is no network.

Without a network ``huggingface_hub`` retries for tens of seconds before it raises an exception that does
not say "offline". Before a download, :func:`hub_access` checks whether the hub can be reached at all (a
TCP connection with a short timeout, or ``HF_HUB_OFFLINE=1``); when it cannot, the download runs in the
hub's offline mode, so a file already in the cache is used at once and a missing one gives
:class:`HubUnavailableError`, one sentence with the fix.
"""
from __future__ import annotations

import functools
import os
import socket
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

__all__ = ["HubUnavailableError", "hub_access", "offline_reason", "PROBE_TIMEOUT"]

#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
PROBE_TIMEOUT = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class HubUnavailableError(ConnectionError):
    """Weights that must come from the hub, with no network to fetch them and no copy in the cache."""


def offline_reason() -> str | None:
    """Why the hub cannot be reached (``HF_HUB_OFFLINE`` is set, or no connection), None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # only the proxy knows; let the hub client try through it
    return _probe(urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co")


@functools.lru_cache(maxsize=None)
def _probe(host: str) -> str | None:
    """Asked once per process: a run that builds several backbones waits at most one timeout."""
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or error or 'timed out'})"
    return None


@contextmanager
def hub_access(what: str, local: str) -> Iterator[None]:
    """Around a hub download of ``what`` (e.g. "timm's weights for vit_base_patch16_224"); ``local`` says how
    to give a local file instead (e.g. "pretrained_file=PATH")."""
    reason = offline_reason()
    if reason is None:
        yield
        return
    from huggingface_hub import constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    except (OSError, ValueError) as error:  # the hub's offline and missing-file errors derive from these
        raise HubUnavailableError(
            f"cannot download {what}: {reason}, and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). "
            f"Connect to the network and run again, copy that cache from a machine that has the file, or pass "
            f"{local}") from None
    finally:
        constants.HF_HUB_OFFLINE = offline
