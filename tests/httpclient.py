"""A small blocking HTTP client for tests: one fresh connection per request, JSON in and out."""

import http.client
import json


class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def _error(self):
        error = self.json["error"]
        assert set(error) == {"message", "type", "code"}, self.body
        assert error["code"] == self.status, self.body
        assert isinstance(error["type"], str) and isinstance(error["message"], str), self.body
        return error

    @property
    def error(self):
        """The message of a JSON error reply, after checking its shape."""
        return self._error()["message"]

    @property
    def error_type(self):
        return self._error()["type"]

    def __repr__(self):
        return "<Reply %d %r>" % (self.status, self.body[:500])


class Client:
    """Requests to one HTTP server, each on a fresh TCP connection."""

    def __init__(self, host, port, timeout=60):
        self.host, self.port, self.timeout = host, port, timeout
        self.url = "http://%s:%d" % (host, port)

    def request(self, method, path, body=None, headers=None, timeout=None):
        """body: a JSON-able object, or bytes sent as they are."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            headers = dict(headers or {})
            data = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
            elif method == "POST":
                data = b""
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def post_as(self, path, body, content_type):
        """POSTs bytes with exactly this Content-Type (None: no such header); a body of None
        sends no Content-Length either, as a request without a body."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.putrequest("POST", path)
            if content_type is not None:
                conn.putheader("Content-Type", content_type)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def ok(self, method, path, body=None, status=200, **kw):
        reply = self.request(method, path, body, **kw)
        assert reply.status == status, reply
        return reply.json
