"""URL openers for clients that send credentials (the judge's API key, the reward server's token).

``urllib`` follows redirects by itself and carries every header along, ``Authorization`` included, to whatever host
the ``Location`` names, plain http too; and it takes that host's answer as the reply. A client holding a secret must
not: every redirect is refused with one line naming where it pointed, so the user can put the real URL in the
config. (Following same-origin redirects only would save that edit for a few servers; an API endpoint that moved
is better fixed once in the config than silently re-resolved on every request.)
"""
from __future__ import annotations

import urllib.error
import urllib.request

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class RedirectRefused(urllib.error.HTTPError):
    """A 3xx answer, not followed: its ``reason`` names the status and where it pointed."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RedirectRefused(req.full_url, code, f"redirect ({code}) to {newurl} refused: credentials are never "
                                                  f"sent across a redirect; set the URL it points to instead",
                              headers, fp)


def credential_opener(host: str | None) -> urllib.request.OpenerDirector:
    """An opener that refuses redirects; for a host on this machine it also ignores ``http_proxy`` from the
    environment (common on clusters), which would otherwise carry a local request off the machine."""
    handlers: list = [_RefuseRedirects()]
    if host in LOOPBACK_HOSTS:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)
