"""Schemas of the AI task kinds' payloads, and JSON Schema checks of their outputs.

One parser serves the server (at Submit, INVALID_ARGUMENT naming the field
path) and the agent (again before any provider call), so both refuse the same
bytes with the same words. It is strict on purpose: unknown keys are refused
rather than forwarded, because whatever passes here is sent to a paid API
under a key the submitter never sees. Any input, however malformed, raises
:class:`PayloadError` and nothing else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NoReturn

import jsonschema
import jsonschema.exceptions
import referencing
import referencing.exceptions
from jsonschema.validators import Draft202012Validator

AI_KINDS: frozenset[str] = frozenset({"anthropic.messages", "claude-code", "ollama.chat"})
PROVIDERS: dict[str, str] = {
    "anthropic.messages": "anthropic",
    "claude-code": "anthropic",
    "ollama.chat": "ollama",
}
CLAUDE_CODE_DEFAULT_MAX_TURNS = 10
"""``--max-turns`` when a claude-code payload names none (money is the real ceiling)."""

MAX_SCHEMA_BYTES = 100_000
MAX_NAME_CHARS = 256
MAX_LIST_ITEMS = 1000

# Provider framing around tool definitions (the API adds a tool-use system
# prompt of a few hundred tokens): counted so input_bytes stays an upper bound.
TOOLS_OVERHEAD_BYTES = 2048

# Anything that looks like a credential is refused by name, with its own
# message: the key comes from the agent's configuration, never from a task.
_KEY_LIKE = frozenset(
    {"api_key", "apikey", "api-key", "x-api-key", "x_api_key", "authorization", "auth_token"}
)


class PayloadError(ValueError):
    """A payload (or output, or output schema) that does not fit its schema.

    ``path`` names the field, like ``payload.messages[2].role``;
    ``str(err) == f"{path}: {message}"``. Messages never echo long input.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """Caps applied at Submit and on the agent (the server may pass its configured ones)."""

    max_bytes: int = 1_000_000
    """Whole payload, in bytes."""
    max_messages: int = 1000
    max_tokens_cap: int = 64_000
    """Upper bound for anthropic / ollama ``max_tokens``."""
    max_turns_cap: int = 100
    """Upper bound for claude-code ``max_turns``."""
    max_depth: int = 64
    """JSON nesting depth (deeper documents are refused before they reach a recursive parser)."""


@dataclass(frozen=True, slots=True)
class AiRequest:
    """What the control plane needs to know about an AI task to price and route it."""

    kind: str
    provider: str
    """``anthropic`` or ``ollama``."""
    model: str
    max_tokens: int
    """0 for claude-code: its ceiling is money (``--max-budget-usd``), not tokens."""
    input_bytes: int
    """UTF-8 bytes of everything sent as input (messages, system, tools, prompt):
    an upper bound on the input tokens."""


def parse_ai_payload(
    kind: str, payload: bytes, limits: PayloadLimits = PayloadLimits()
) -> AiRequest:
    """Validate an AI task's payload; raise :class:`PayloadError` for any bad input."""
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise PayloadError("kind", f"not an AI task kind (one of {', '.join(sorted(AI_KINDS))})")
    try:
        doc = _load_json("payload", payload, limits.max_bytes, limits.max_depth)
        if not isinstance(doc, dict):
            _fail("payload", f"must be a JSON object, not {_type_name(doc)}")
        return parser(doc, limits)
    except PayloadError:
        raise
    except (RecursionError, MemoryError) as err:
        raise PayloadError("payload", "too large or nested too deeply") from err
    except Exception as err:  # a bug here must still read as "bad payload", never crash
        raise PayloadError("payload", f"cannot be validated ({type(err).__name__})") from err


def parse_output_schema(text: str) -> dict[str, Any]:
    """A task's ``output_schema``: a JSON object that is a valid Draft 2020-12 schema.

    Remote ``$ref``s are refused: checking an output must never fetch anything.
    """
    path = "output_schema"
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise PayloadError(path, "is not UTF-8") from err
    if not isinstance(text, str):
        _fail(path, "must be a JSON document")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PayloadError(path, "is not valid Unicode text") from err
    try:
        doc = _load_json(path, raw, MAX_SCHEMA_BYTES, 64)
        if not isinstance(doc, dict):
            _fail(path, f"must be a JSON object, not {_type_name(doc)}")
        _refuse_remote_refs(doc, path)
        try:
            Draft202012Validator.check_schema(doc)
        except jsonschema.SchemaError as err:
            where = _json_path(path, err.absolute_path)
            raise PayloadError(where, f"not a valid JSON Schema: {_short(err.message)}") from err
        return doc
    except PayloadError:
        raise
    except Exception as err:
        raise PayloadError(path, f"cannot be checked ({type(err).__name__})") from err


def check_output(schema: dict[str, Any], output: bytes) -> None:
    """Raise ``PayloadError(path="output...")`` unless ``output`` is JSON matching ``schema``."""
    try:
        doc = _load_json("output", output, None, 256)
    except PayloadError as err:
        raise PayloadError(
            "output", f"is not JSON matching the output schema ({err.message})"
        ) from err
    validator = Draft202012Validator(schema, registry=_NO_RETRIEVAL)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    except referencing.exceptions.Unresolvable as err:
        raise PayloadError("output_schema", f"a $ref cannot be resolved: {err}") from err
    except (RecursionError, MemoryError) as err:
        raise PayloadError("output", "is nested too deeply to check") from err
    except Exception as err:
        raise PayloadError("output", f"cannot be checked ({type(err).__name__})") from err
    if error is not None:
        where = _json_path("output", error.absolute_path)
        raise PayloadError(where, f"does not match the output schema: {_short(error.message)}")


# Parsing ------------------------------------------------------------------


def _load_json(path: str, data: object, max_bytes: int | None, max_depth: int) -> Any:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        _fail(path, "must be bytes")
    if max_bytes is not None and len(data) > max_bytes:
        _fail(path, f"is {len(data)} bytes, more than the limit of {max_bytes}")
    if not data.strip():
        _fail(path, "is empty")
    if _depth(data) > max_depth:
        _fail(path, f"is nested more than {max_depth} levels deep")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PayloadError(path, f"is not UTF-8 (byte {err.start})") from err
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except PayloadError:
        raise
    except json.JSONDecodeError as err:
        raise PayloadError(
            path, f"is not JSON: {err.msg} (line {err.lineno} column {err.colno})"
        ) from err
    except (ValueError, RecursionError, MemoryError) as err:
        raise PayloadError(path, f"is not acceptable JSON ({_short(str(err))})") from err


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _depth(data: bytes) -> int:
    """Maximum bracket nesting outside strings, found at C speed and without recursion."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(accumulate(1 if b in b"[{" else -1 for b in brackets))


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a repeated key; refuse the ambiguity.
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"repeated key {_short(key, 40)!r}")
        doc[key] = value
    return doc


# The three kinds ------------------------------------------------------------

_ANTHROPIC_KEYS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
    }
)


def _parse_anthropic(doc: dict[str, Any], limits: PayloadLimits) -> AiRequest:
    p = "payload"
    _check_keys(doc, p, _ANTHROPIC_KEYS, required=("model", "max_tokens", "messages"))
    model = _model(doc["model"], f"{p}.model")
    max_tokens = _int(doc["max_tokens"], f"{p}.max_tokens", 1, limits.max_tokens_cap)
    messages = _list(doc["messages"], f"{p}.messages", 1, limits.max_messages)
    for i, message in enumerate(messages):
        mp = f"{p}.messages[{i}]"
        m = _object(message, mp)
        _check_keys(m, mp, frozenset({"role", "content"}), required=("role", "content"))
        _choice(m["role"], f"{mp}.role", ("user", "assistant"))
        _content(m["content"], f"{mp}.content")
    if "system" in doc:
        system = doc["system"]
        if not isinstance(system, str):
            for i, block in enumerate(_list(system, f"{p}.system", 0, MAX_LIST_ITEMS)):
                _block(block, f"{p}.system[{i}]")
    for name in ("temperature", "top_p"):
        if name in doc:
            _number(doc[name], f"{p}.{name}", 0.0, 1.0)
    if "top_k" in doc:
        _int(doc["top_k"], f"{p}.top_k", 0, 1_000_000)
    if "stop_sequences" in doc:
        for i, stop in enumerate(_list(doc["stop_sequences"], f"{p}.stop_sequences", 0, 1000)):
            _str(stop, f"{p}.stop_sequences[{i}]", allow_empty=False)
    if "metadata" in doc:
        metadata = _object(doc["metadata"], f"{p}.metadata")
        _check_keys(metadata, f"{p}.metadata", frozenset({"user_id"}))
        if metadata.get("user_id") is not None:
            _str(metadata["user_id"], f"{p}.metadata.user_id", max_chars=256)
    tools = doc.get("tools")
    if tools is not None:
        for i, tool in enumerate(_list(tools, f"{p}.tools", 0, MAX_LIST_ITEMS)):
            tp = f"{p}.tools[{i}]"
            t = _object(tool, tp)
            _no_key_like(t, tp)
            if "name" not in t:
                _fail(f"{tp}.name", "is required")
            _str(t["name"], f"{tp}.name", allow_empty=False, max_chars=MAX_NAME_CHARS)
            if "type" in t:
                _str(t["type"], f"{tp}.type", allow_empty=False, max_chars=MAX_NAME_CHARS)
            if "input_schema" in t:
                _object(t["input_schema"], f"{tp}.input_schema")
    if "tool_choice" in doc:
        choice = _object(doc["tool_choice"], f"{p}.tool_choice")
        if "type" not in choice:
            _fail(f"{p}.tool_choice.type", "is required")
        kind = _choice(choice["type"], f"{p}.tool_choice.type", ("auto", "any", "tool", "none"))
        if kind == "tool":
            if "name" not in choice:
                _fail(f"{p}.tool_choice.name", "is required when type is 'tool'")
            _str(choice["name"], f"{p}.tool_choice.name", allow_empty=False)
    if "thinking" in doc:
        tp = f"{p}.thinking"
        thinking = _object(doc["thinking"], tp)
        if "type" not in thinking:
            _fail(f"{tp}.type", "is required")
        kind = _choice(thinking["type"], f"{tp}.type", ("enabled", "disabled", "adaptive"))
        if kind == "enabled":
            if "budget_tokens" not in thinking:
                _fail(f"{tp}.budget_tokens", "is required when thinking is enabled")
            budget = _int(thinking["budget_tokens"], f"{tp}.budget_tokens", 1, max_tokens)
            if budget >= max_tokens:
                _fail(f"{tp}.budget_tokens", "must be less than max_tokens")
    input_bytes = _json_bytes(doc["messages"]) + _json_bytes(doc.get("system"))
    if tools:
        input_bytes += _json_bytes(tools) + _json_bytes(doc.get("tool_choice"))
        input_bytes += TOOLS_OVERHEAD_BYTES
    return AiRequest(
        kind="anthropic.messages",
        provider="anthropic",
        model=model,
        max_tokens=max_tokens,
        input_bytes=input_bytes,
    )


def _content(value: object, path: str) -> None:
    if isinstance(value, str):
        return
    for i, block in enumerate(_list(value, path, 1, MAX_LIST_ITEMS)):
        _block(block, f"{path}[{i}]")


def _block(value: object, path: str) -> None:
    block = _object(value, path)
    _no_key_like(block, path)
    if "type" not in block:
        _fail(f"{path}.type", "is required")
    kind = _str(block["type"], f"{path}.type", allow_empty=False, max_chars=MAX_NAME_CHARS)
    if kind == "text":
        if "text" not in block:
            _fail(f"{path}.text", "is required for a text block")
        _str(block["text"], f"{path}.text")


_CLAUDE_CODE_KEYS = frozenset(
    {"prompt", "model", "allowed_tools", "disallowed_tools", "max_turns", "append_system_prompt"}
)


def _parse_claude_code(doc: dict[str, Any], limits: PayloadLimits) -> AiRequest:
    p = "payload"
    _check_keys(doc, p, _CLAUDE_CODE_KEYS, required=("prompt", "model"))
    prompt = _str(doc["prompt"], f"{p}.prompt", allow_empty=False)
    if not prompt.strip():
        _fail(f"{p}.prompt", "is blank")
    model = _model(doc["model"], f"{p}.model")
    for name in ("allowed_tools", "disallowed_tools"):
        if name in doc:
            for i, tool in enumerate(_list(doc[name], f"{p}.{name}", 0, MAX_LIST_ITEMS)):
                _argv_word(tool, f"{p}.{name}[{i}]")
    if "max_turns" in doc:
        _int(doc["max_turns"], f"{p}.max_turns", 1, limits.max_turns_cap)
    system = ""
    if "append_system_prompt" in doc:
        system = _str(doc["append_system_prompt"], f"{p}.append_system_prompt")
    return AiRequest(
        kind="claude-code",
        provider="anthropic",
        model=model,
        max_tokens=0,
        input_bytes=len(prompt.encode("utf-8")) + len(system.encode("utf-8")),
    )


_OLLAMA_KEYS = frozenset({"model", "messages", "max_tokens", "options", "format"})


def _parse_ollama(doc: dict[str, Any], limits: PayloadLimits) -> AiRequest:
    p = "payload"
    _check_keys(doc, p, _OLLAMA_KEYS, required=("model", "messages", "max_tokens"))
    model = _model(doc["model"], f"{p}.model")
    max_tokens = _int(doc["max_tokens"], f"{p}.max_tokens", 1, limits.max_tokens_cap)
    messages = _list(doc["messages"], f"{p}.messages", 1, limits.max_messages)
    for i, message in enumerate(messages):
        mp = f"{p}.messages[{i}]"
        m = _object(message, mp)
        _check_keys(m, mp, frozenset({"role", "content"}), required=("role", "content"))
        _choice(m["role"], f"{mp}.role", ("system", "user", "assistant", "tool"))
        _str(m["content"], f"{mp}.content")
    if "options" in doc:
        options = _object(doc["options"], f"{p}.options")
        _no_key_like(options, f"{p}.options")
        if "num_predict" in options:
            _fail(f"{p}.options.num_predict", "is set from max_tokens; do not give it")
        for key, value in options.items():
            if not isinstance(value, str | int | float | bool | list):
                _fail(f"{p}.options.{key}", f"must be a scalar or a list, not {_type_name(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"{p}.options.{key}", "must be a finite number")
    if "format" in doc:
        fmt = doc["format"]
        if isinstance(fmt, str):
            if fmt != "json":
                _fail(f"{p}.format", "must be 'json' or a JSON schema object")
        else:
            _object(fmt, f"{p}.format")
    return AiRequest(
        kind="ollama.chat",
        provider="ollama",
        model=model,
        max_tokens=max_tokens,
        input_bytes=_json_bytes(messages),
    )


_PARSERS: Mapping[str, Callable[[dict[str, Any], PayloadLimits], AiRequest]] = {
    "anthropic.messages": _parse_anthropic,
    "claude-code": _parse_claude_code,
    "ollama.chat": _parse_ollama,
}


# Field checks ---------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    raise PayloadError(path, message)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_path(path: str, key: str) -> str:
    shown = _short(key, 40)
    if shown.isidentifier():
        return f"{path}.{shown}"
    return f"{path}[{json.dumps(shown)}]"


def _check_keys(
    doc: dict[str, Any], path: str, allowed: frozenset[str], required: tuple[str, ...] = ()
) -> None:
    _no_key_like(doc, path)
    if "stream" in doc and "stream" not in allowed:
        _fail(f"{path}.stream", "is not allowed: the agent decides how to call the provider")
    for key in doc:
        if key not in allowed:
            _fail(_key_path(path, key), "is not an accepted field")
    for key in required:
        if key not in doc:
            _fail(f"{path}.{key}", "is required")


def _no_key_like(doc: dict[str, Any], path: str) -> None:
    for key in doc:
        if key.lower() in _KEY_LIKE:
            _fail(
                _key_path(path, key),
                "credentials are not accepted in a payload (the agent holds the key)",
            )


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, f"must be an object, not {_type_name(value)}")
    return value


def _list(value: object, path: str, min_items: int, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        _fail(path, f"must be a list, not {_type_name(value)}")
    if len(value) < min_items:
        _fail(path, "must not be empty" if min_items == 1 else f"needs {min_items} items")
    if len(value) > max_items:
        _fail(path, f"has {len(value)} items, more than the limit of {max_items}")
    return value


def _str(
    value: object, path: str, *, allow_empty: bool = True, max_chars: int | None = None
) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, not {_type_name(value)}")
    if not allow_empty and not value:
        _fail(path, "must not be empty")
    if max_chars is not None and len(value) > max_chars:
        _fail(path, f"is longer than {max_chars} characters")
    return value


def _model(value: object, path: str) -> str:
    model = _str(value, path, allow_empty=False, max_chars=MAX_NAME_CHARS)
    if model != model.strip() or any(not c.isprintable() for c in model):
        _fail(path, "must be a model name without spaces around it or control characters")
    if model.startswith("-"):
        _fail(path, "must not start with '-'")
    return model


def _argv_word(value: object, path: str) -> str:
    """A string that ends up as one command-line argument: never an option, never blank."""
    word = _str(value, path, allow_empty=False, max_chars=MAX_NAME_CHARS)
    if not word.strip() or word.startswith("-"):
        _fail(path, "must be a tool name (not blank, not starting with '-')")
    if any(not c.isprintable() for c in word):
        _fail(path, "must not contain control characters")
    return word


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"must be an integer, not {_type_name(value)}")
    if not low <= value <= high:
        _fail(path, f"must be between {low} and {high}")
    return value


def _number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"must be a number, not {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        _fail(path, f"must be between {low:g} and {high:g}")
    return number


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, f"must be one of {', '.join(choices)}")
    return value


def _json_bytes(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


# Output schemas ---------------------------------------------------------------


def _refuse_remote_refs(doc: object, path: str) -> None:
    """Walk the schema (iteratively) and refuse any ``$ref`` that points outside it."""
    stack: list[tuple[object, str]] = [(doc, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if (
                    key in ("$ref", "$dynamicRef")
                    and isinstance(value, str)
                    and not value.startswith("#")
                ):
                    _fail(_key_path(where, key), "only references within the schema ('#...')")
                stack.append((value, _key_path(where, key)))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))


# An empty registry resolves nothing outside the schema and never fetches
# (jsonschema's default would still retrieve remote references).
_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()


def _json_path(root: str, parts: Iterable[object]) -> str:
    path = root
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _key_path(path, str(part))
    return path
