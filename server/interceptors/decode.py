"""Request decoding that never raises: what the errors interceptor puts in place of a
handler's ``request_deserializer``.

grpc-python decodes each request message with the handler's deserializer before any
interceptor's behaviour sees it (for request streams: as the handler reads). A decode
error there becomes UNKNOWN or INTERNAL with the Python exception in the details. The
deserializer made here returns a :class:`Refused` marker instead, carrying the short
message the caller gets with INVALID_ARGUMENT; the errors interceptor refuses the call
when it meets one.

Two things are refused at this door, for every method of every service:

- bytes that are not a valid message of the request type (wire format, invalid UTF-8
  in a string, nesting too deep);
- a NUL character in any string field, however deep: no Muster field has a use for
  one, Postgres cannot store one (a NUL reaching a query was INTERNAL), and it cuts
  strings short in C code and logs. The message names the field path, e.g.
  ``hello.in_flight[0].task_id: NUL characters are not allowed``. The exception is
  :data:`NUL_ALLOWED`: an attempt's error text, which the dispatcher stores with each
  NUL escaped, and a progress message, which is not stored (an executor's stderr or a
  model's output may hold a NUL; refusing would close the stream over it, again and
  again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = ["NUL_ALLOWED", "Refused", "message_name", "nul_field", "safe_deserializer"]

NUL_ALLOWED = frozenset({"muster.v1.Result.error", "muster.v1.Progress.message"})
"""Fields (full names) that carry an executor's or a model's text and that the server
handles with a NUL in it: an attempt's error (stored with each NUL escaped) and a
progress message (never stored)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A request message that was refused while decoding, and why (for the caller)."""

    detail: str


def message_name(deserialize: Callable[[bytes], Any] | None) -> str:
    """The message type a generated deserializer (``Message.FromString``) decodes."""
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "")) or "request"


def safe_deserializer(
    deserialize: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """``deserialize``, returning :class:`Refused` instead of raising; None stays None
    (a handler that takes raw bytes)."""
    if deserialize is None:
        return None
    undecodable = Refused(f"request is not a valid {message_name(deserialize)} message")

    def safe(raw: bytes) -> Any:
        try:
            message = deserialize(raw)
        except Exception:
            # Whatever the decoder says (wire format, recursion depth, invalid UTF-8 in
            # a string field) is not for the caller: the status says it all.
            return undecodable
        if isinstance(message, Message) and (field := nul_field(message)) is not None:
            return Refused(f"{field}: NUL characters are not allowed")
        return message

    return safe


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string field (or map key) holding a NUL, else None."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING and field.full_name not in NUL_ALLOWED:
            items = value if field.is_repeated else (value,)
            for index, item in enumerate(items):
                if "\x00" in item:
                    return f"{path}[{index}]" if field.is_repeated else path
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                found = _nul_in_map(field, value, path)
            elif field.is_repeated:
                found = next(
                    (
                        hit
                        for index, item in enumerate(value)
                        if (hit := nul_field(item, f"{path}[{index}].")) is not None
                    ),
                    None,
                )
            else:
                found = nul_field(value, f"{path}.")
            if found is not None:
                return found
    return None


def _nul_in_map(field: FieldDescriptor, entries: Any, path: str) -> str | None:
    assert field.message_type is not None  # a map field's entry type
    value_field = field.message_type.fields_by_name["value"]
    for key, value in entries.items():
        if isinstance(key, str) and "\x00" in key:
            return path
        if isinstance(value, str) and "\x00" in value:
            return f"{path}[{key!a}]"
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            found = nul_field(value, f"{path}[{key!a}].")
            if found is not None:
                return found
    return None
