"""URLs kvcm is configured with, as they may be shown: in logs, messages and the status page."""

import urllib.parse


def redact_url(url):
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc="%s:***@%s" % (user, netloc)))
