"""`--log-http`: every request and its answer logged at info level (method, path, peer,
headers, body up to 512 KiB; a streamed body is not logged), as llm-d's simulator does. For
trusted environments only: headers such as Authorization are logged as they come."""

import functools
import inspect
import logging

from kvcm.http import HttpError

log = logging.getLogger("kvcm.sim.http")

MAX_LOGGED_BODY = 512 * 1024


def _body(data):
    if isinstance(data, str):
        data = data.encode()
    text = data[:MAX_LOGGED_BODY].decode("utf-8", "replace")
    if len(data) > MAX_LOGGED_BODY:
        text += " ... [truncated, %d bytes in all]" % len(data)
    return text


def _log_response(response):
    body = getattr(response, "body", None)
    log.info("HTTP response: status %d, headers %s, body %s", response.status, list(response.headers or ()),
             "<streamed, not logged>" if body is None else _body(body))
    return response


def logged(handler):
    """The handler, logging what it receives and answers."""
    @functools.wraps(handler)
    def wrapper(request):
        log.info("HTTP request: %s %s%s from %s, headers %s, body %s", request.method, request.path,
                 "?" + request.query if request.query else "", "%s:%s" % request.peer if request.peer else "-",
                 request.headers, _body(request.body))
        try:
            result = handler(request)
        except HttpError as exc:
            _log_response(exc.response())
            raise
        if inspect.isawaitable(result):
            return _awaited(result)
        return _log_response(result)
    return wrapper


async def _awaited(result):
    try:
        response = await result
    except HttpError as exc:
        _log_response(exc.response())
        raise
    return _log_response(response)


class LoggingRouter:
    """A Router facade whose added handlers are logged()."""

    def __init__(self, router):
        self.router = router

    def add(self, method, pattern, handler):
        self.router.add(method, pattern, logged(handler))
