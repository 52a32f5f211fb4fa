"""Tool calls of chat requests, as llm-d's simulator makes them up.

`check_tools` validates a request's `tools` (unless `--skip-tool-validation`): every
function needs `parameters`, a JSON schema written with the keywords llm-d's simulator
whitelists (type, description, enum, properties, items, required, additionalProperties,
minItems, maxItems, default, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
minLength, maxLength, pattern, format, title), `enum` values of the declared type,
`items` for arrays and `properties` for objects.

`make_tool_calls` decides the calls: `tool_choice` "none" makes none; a named function makes
exactly one call to it; "required" at least one, "auto" (the default) possibly none (then
the answer is text). Each further call happens with `--tool-call-extra-call-probability`
percent, until a roll fails or there are as many calls as tools. A call's arguments follow
its tool's schema: required parameters always, others with
`--tool-call-not-required-param-probability` percent (object fields with
`--object-tool-call-not-required-field-probability`); enums pick a value; integers, numbers
and array lengths lie within the `--min/max-tool-call-*` bounds (an array's own
minItems/maxItems win); strings are picked from a fixed list.
"""

import orjson

from kvcm.sim.errors import error

FAKE_STRINGS = ("testing", "hello", "Boston", "sunny", "temperature", "cloudy", "question", "Yorick", "silence",
                "lifetime")
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ENUM_ITEM = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,)}
_STRING_KEYS = ("description", "pattern", "format", "title")
_COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength")
_KEYS = frozenset(("type", "enum", "properties", "items", "required", "additionalProperties", "default",
                   "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") + _STRING_KEYS + _COUNT_KEYS)


class ToolCall:
    """One generated call: id, function name, and its arguments as JSON text."""

    __slots__ = ("index", "id", "name", "arguments")

    def __init__(self, index, call_id, name, arguments):
        self.index, self.id, self.name, self.arguments = index, call_id, name, arguments

    def as_json(self):
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_schema(schema, where):
    if not isinstance(schema, dict):
        raise ValueError("%s must be an object" % where)
    unknown = set(schema) - _KEYS
    if unknown:
        raise ValueError("%s: unsupported keyword %r" % (where, sorted(unknown)[0]))
    kind = schema.get("type")
    if kind not in _TYPES:
        raise ValueError("%s: 'type' must be one of %s" % (where, ", ".join(_TYPES)))
    for key in _STRING_KEYS:
        if key in schema and not isinstance(schema[key], str):
            raise ValueError("%s: %r must be a string" % (where, key))
    for key in _COUNT_KEYS:
        if key in schema and (type(schema[key]) is not int or schema[key] < 0):
            raise ValueError("%s: %r must be a non-negative integer" % (where, key))
    for key in ("minimum", "maximum"):
        if key in schema and not _number(schema[key]):
            raise ValueError("%s: %r must be a number" % (where, key))
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not (_number(schema[key]) or isinstance(schema[key], bool)):
            raise ValueError("%s: %r must be a number or a boolean" % (where, key))
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        raise ValueError("%s: 'additionalProperties' must be a boolean" % where)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError("%s: 'required' must be a list of strings" % where)
    if "enum" in schema:
        allowed = _ENUM_ITEM.get(kind)
        if allowed is None:
            raise ValueError("%s: a %s parameter cannot have an enum" % (where, kind))
        enum = schema["enum"]
        if not isinstance(enum, list) or not all(isinstance(v, allowed) and (kind == "boolean") ==
                                                 isinstance(v, bool) for v in enum):
            raise ValueError("%s: 'enum' must be a list of %s values" % (where, kind))
    properties = schema.get("properties")
    if kind == "object" and properties is None:
        raise ValueError("%s: an object parameter needs 'properties'" % where)
    if properties is not None:
        if not isinstance(properties, dict):
            raise ValueError("%s: 'properties' must be an object" % where)
        for name, prop in properties.items():
            _check_schema(prop, "%s.properties.%s" % (where, name))
    items = schema.get("items")
    if kind == "array" and items is None:
        raise ValueError("%s: an array parameter needs 'items'" % where)
    for i, item in enumerate(items if isinstance(items, list) else [] if items is None else [items]):
        _check_schema(item, "%s.items%s" % (where, "[%d]" % i if isinstance(items, list) else ""))


def check_tools(tools, validate):
    """The request's tools ([{"type": "function", "function": {...}}]); 400 when malformed."""
    if not isinstance(tools, list):
        raise error(400, "'tools' must be a list", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise error(400, "tools[%d] must be {\"type\": \"function\", \"function\": {\"name\": ...}}" % i,
                        param="tools")
        if not validate:
            continue
        try:
            if not isinstance(function.get("description", ""), str):
                raise ValueError("'description' must be a string")
            if "parameters" not in function:
                raise ValueError("missing properties: 'parameters'")
            _check_schema(function["parameters"], "parameters")
        except ValueError as exc:
            raise error(400, "Tool validation failed: tools[%d] (%s): %s" % (i, function["name"], exc),
                        param="tools") from None
    return tools


def tool_choice(body, tools):
    """(minimum calls, the tools to choose from) of a request, or None for no tool calls."""
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        return 0, tools
    if choice == "required":
        return 1, tools
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise error(400, "tool with name '%s' requested in tool_choice but not found in the tools list" % name,
                        param="tool_choice")
        return 1, chosen[:1]
    raise error(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}",
                param="tool_choice")


def _percent(rng, probability):
    return rng.random() < probability / 100


def _argument(schema, config, rng):
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    kind = schema.get("type")
    if kind == "string":
        return rng.choice(FAKE_STRINGS)
    if kind == "integer":
        return rng.randint(config.min_tool_call_integer_param, config.max_tool_call_integer_param)
    if kind == "number":
        return rng.uniform(config.min_tool_call_number_param, config.max_tool_call_number_param)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        low = schema.get("minItems", config.min_tool_call_array_param_length)
        high = schema.get("maxItems", config.max_tool_call_array_param_length)
        if low > high:
            raise error(400, "minItems (%d) is greater than maxItems (%d)" % (low, high), param="tools")
        items = schema.get("items") or {}
        items = items[0] if isinstance(items, list) and items else items
        return [_argument(items, config, rng) for _ in range(rng.randint(low, high))]
    if kind == "object":
        return _fields(schema, config.object_tool_call_not_required_field_probability, config, rng)
    return None


def _fields(schema, optional_probability, config, rng):
    required = set(schema.get("required") or ())
    return {name: _argument(prop, config, rng) for name, prop in (schema.get("properties") or {}).items()
            if name in required or _percent(rng, optional_probability)}


def make_tool_calls(minimum, tools, config, rng):
    """The calls of one answer ([] when it answers with text)."""
    count = minimum
    while count < len(tools) and _percent(rng, config.tool_call_extra_call_probability):
        count += 1
    calls = []
    for index in range(count):
        tool = tools[rng.randrange(len(tools))]["function"]
        arguments = _fields(tool.get("parameters") or {}, config.tool_call_not_required_param_probability,
                            config, rng)
        calls.append(ToolCall(index, "chatcmpl-tool-%010d" % rng.randrange(10 ** 10), tool["name"],
                              orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()))
    return calls
