"""OpenAI-style errors of the simulated API: `{"error": {"message", "type", "param", "code"}}`.

`type` is the openai client's exception class name for the status (what vLLM and llm-d's
simulator write); `param` names the request field at fault, or is null.
"""

import orjson

from kvcm.http import HttpError, Response

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 409: "ConflictError", 422: "UnprocessableEntityError",
               429: "RateLimitError"}


def error_type(status):
    return ERROR_TYPES.get(status) or ("InternalServerError" if status >= 500 else "APIConnectionError")


class SimError(HttpError):
    """An API error with its `param`."""

    def __init__(self, status, message, param=None, headers=()):
        super().__init__(status, message, error_type(status), headers)
        self.param = param

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self):
        return Response(self.status, orjson.dumps(self.body()), headers=self.headers)


def error(status, message, param=None):
    return SimError(status, message, param)
