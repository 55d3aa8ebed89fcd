"""muster.ai.payloads: the AI kinds' schemas, refused with field paths; output schemas."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from muster.ai import (
    AI_KINDS,
    PROVIDERS,
    AiRequest,
    PayloadError,
    PayloadLimits,
    check_output,
    parse_ai_payload,
    parse_output_schema,
)

DEFAULT = PayloadLimits()


def anthropic(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    body.update(overrides)
    return body


def claude_code(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "Fix the bug", "model": "claude-sonnet-4-5"}
    body.update(overrides)
    return body


def ollama(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "llama3.2",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    body.update(overrides)
    return body


def parse(kind: str, doc: object, limits: PayloadLimits = DEFAULT) -> AiRequest:
    return parse_ai_payload(kind, json.dumps(doc).encode(), limits)


def refused(kind: str, doc: object, limits: PayloadLimits = DEFAULT) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        parse(kind, doc, limits)
    err = info.value
    assert str(err) == f"{err.path}: {err.message}"
    return err


def test_the_kinds_and_their_providers() -> None:
    assert frozenset(PROVIDERS) == AI_KINDS
    assert set(PROVIDERS.values()) == {"anthropic", "ollama"}


def test_a_minimal_anthropic_request() -> None:
    req = parse("anthropic.messages", anthropic())
    assert req == AiRequest(
        kind="anthropic.messages",
        provider="anthropic",
        model="claude-sonnet-4-5",
        max_tokens=256,
        input_bytes=len(json.dumps(anthropic()["messages"], separators=(",", ":"))),
    )


def test_a_full_anthropic_request_is_accepted_and_counts_every_input() -> None:
    doc = anthropic(
        system=[{"type": "text", "text": "Be brief", "cache_control": {"type": "ephemeral"}}],
        temperature=0.5,
        top_p=1,
        top_k=5,
        stop_sequences=["END"],
        metadata={"user_id": "u-1"},
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        tool_choice={"type": "tool", "name": "get_weather"},
        thinking={"type": "enabled", "budget_tokens": 128},
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "héllo"}]},
            {"role": "assistant", "content": "hi"},
            {
                "role": "user",
                "content": [{"type": "image", "source": {"type": "base64", "data": "AAAA"}}],
            },
        ],
    )
    req = parse("anthropic.messages", doc)
    assert req.model == "claude-sonnet-4-5"
    minimal = parse("anthropic.messages", anthropic(messages=doc["messages"]))
    # The system prompt and the tools (with their framing allowance) add to the input.
    assert req.input_bytes > minimal.input_bytes + 2048
    assert "héllo".encode() in json.dumps(doc["messages"], ensure_ascii=False).encode()


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"max_tokens": 1, "messages": []}, "payload.model"),
        (anthropic(model=""), "payload.model"),
        (anthropic(model=7), "payload.model"),
        (anthropic(model=" claude"), "payload.model"),
        (anthropic(model="a\x00b"), "payload.model"),
        (anthropic(model="x" * 300), "payload.model"),
        (anthropic(max_tokens=0), "payload.max_tokens"),
        (anthropic(max_tokens=64_001), "payload.max_tokens"),
        (anthropic(max_tokens=1.5), "payload.max_tokens"),
        (anthropic(max_tokens=True), "payload.max_tokens"),
        (anthropic(max_tokens="10"), "payload.max_tokens"),
        (anthropic(messages=[]), "payload.messages"),
        (anthropic(messages={}), "payload.messages"),
        (anthropic(messages=["hi"]), "payload.messages[0]"),
        (anthropic(messages=[{"role": "user"}]), "payload.messages[0].content"),
        (anthropic(messages=[{"content": "x"}]), "payload.messages[0].role"),
        (
            anthropic(
                messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
            ),
            "payload.messages[1].role",
        ),
        (anthropic(messages=[{"role": "user", "content": 5}]), "payload.messages[0].content"),
        (anthropic(messages=[{"role": "user", "content": []}]), "payload.messages[0].content"),
        (
            anthropic(messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "payload.messages[0].content[0].type",
        ),
        (
            anthropic(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "payload.messages[0].content[0].text",
        ),
        (
            anthropic(messages=[{"role": "user", "content": "x", "name": "bob"}]),
            "payload.messages[0].name",
        ),
        (anthropic(system=5), "payload.system"),
        (anthropic(system=[{"type": "text", "text": 1}]), "payload.system[0].text"),
        (anthropic(temperature=1.5), "payload.temperature"),
        (anthropic(temperature=-0.1), "payload.temperature"),
        (anthropic(temperature="hot"), "payload.temperature"),
        (anthropic(top_p=2), "payload.top_p"),
        (anthropic(top_k=-1), "payload.top_k"),
        (anthropic(stop_sequences="END"), "payload.stop_sequences"),
        (anthropic(stop_sequences=["a", 1]), "payload.stop_sequences[1]"),
        (anthropic(stop_sequences=[""]), "payload.stop_sequences[0]"),
        (anthropic(metadata={"user_id": 5}), "payload.metadata.user_id"),
        (anthropic(metadata={"email": "a@b"}), "payload.metadata.email"),
        (anthropic(tools={}), "payload.tools"),
        (anthropic(tools=[{"input_schema": {}}]), "payload.tools[0].name"),
        (anthropic(tools=[{"name": "t", "input_schema": []}]), "payload.tools[0].input_schema"),
        (anthropic(tool_choice={"type": "maybe"}), "payload.tool_choice.type"),
        (anthropic(tool_choice={"type": "tool"}), "payload.tool_choice.name"),
        (anthropic(tool_choice={}), "payload.tool_choice.type"),
        (anthropic(thinking={"type": "enabled"}), "payload.thinking.budget_tokens"),
        (
            anthropic(thinking={"type": "enabled", "budget_tokens": 256}),
            "payload.thinking.budget_tokens",
        ),
        (anthropic(thinking={"type": "on"}), "payload.thinking.type"),
        (anthropic(stream=True), "payload.stream"),
        (anthropic(api_key="sk-ant-x"), "payload.api_key"),
        (anthropic(**{"x-api-key": "sk-ant-x"}), 'payload["x-api-key"]'),
        (anthropic(Authorization="Bearer x"), "payload.Authorization"),
        (anthropic(unknown=1), "payload.unknown"),
        (anthropic(service_tier="auto"), "payload.service_tier"),
        (
            anthropic(
                messages=[
                    {"role": "user", "content": [{"type": "text", "text": "x", "api_key": "k"}]}
                ]
            ),
            "payload.messages[0].content[0].api_key",
        ),
    ],
)
def test_bad_anthropic_requests_name_the_field(doc: object, path: str) -> None:
    assert refused("anthropic.messages", doc).path == path


def test_key_like_fields_say_why() -> None:
    err = refused("anthropic.messages", anthropic(api_key="sk-ant-secret"))
    assert "credentials" in err.message
    assert "sk-ant-secret" not in str(err)


def test_limits_are_configurable() -> None:
    limits = PayloadLimits(max_bytes=2000, max_messages=2, max_tokens_cap=100, max_turns_cap=3)
    msgs = [{"role": "user", "content": "a"}] * 3
    assert (
        refused("anthropic.messages", anthropic(messages=msgs, max_tokens=50), limits).path
        == "payload.messages"
    )
    assert refused("anthropic.messages", anthropic(max_tokens=101), limits).path == (
        "payload.max_tokens"
    )
    big = anthropic(messages=[{"role": "user", "content": "x" * 3000}])
    err = refused("anthropic.messages", big, limits)
    assert err.path == "payload" and "limit of 2000" in err.message
    assert refused("claude-code", claude_code(max_turns=4), limits).path == "payload.max_turns"
    assert parse("claude-code", claude_code(max_turns=3), limits).max_tokens == 0


def test_claude_code_requests() -> None:
    req = parse(
        "claude-code",
        claude_code(
            allowed_tools=["Read", "Bash(git log:*)"],
            disallowed_tools=["WebFetch"],
            max_turns=5,
            append_system_prompt="- be terse",
        ),
    )
    assert req == AiRequest(
        kind="claude-code",
        provider="anthropic",
        model="claude-sonnet-4-5",
        max_tokens=0,
        input_bytes=len("Fix the bug") + len("- be terse"),
    )


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"model": "m"}, "payload.prompt"),
        ({"prompt": "p"}, "payload.model"),
        (claude_code(prompt=""), "payload.prompt"),
        (claude_code(prompt="  \n"), "payload.prompt"),
        (claude_code(prompt=["a"]), "payload.prompt"),
        (claude_code(model="--dangerously-skip-permissions"), "payload.model"),
        (claude_code(allowed_tools="Read"), "payload.allowed_tools"),
        (
            claude_code(allowed_tools=["Read", "--dangerously-skip-permissions"]),
            "payload.allowed_tools[1]",
        ),
        (claude_code(disallowed_tools=[""]), "payload.disallowed_tools[0]"),
        (claude_code(disallowed_tools=["a\nb"]), "payload.disallowed_tools[0]"),
        (claude_code(max_turns=0), "payload.max_turns"),
        (claude_code(max_turns=101), "payload.max_turns"),
        (claude_code(append_system_prompt=1), "payload.append_system_prompt"),
        (claude_code(cwd="/etc"), "payload.cwd"),
        (claude_code(claude_bin="/bin/sh"), "payload.claude_bin"),
        (claude_code(api_key="k"), "payload.api_key"),
    ],
)
def test_bad_claude_code_requests_name_the_field(doc: object, path: str) -> None:
    assert refused("claude-code", doc).path == path


def test_ollama_requests() -> None:
    req = parse("ollama.chat", ollama(options={"temperature": 0.2, "stop": ["x"]}, format="json"))
    assert (req.provider, req.model, req.max_tokens) == ("ollama", "llama3.2", 64)
    assert parse("ollama.chat", ollama(format={"type": "object"})).kind == "ollama.chat"


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "payload.max_tokens"),
        (ollama(max_tokens=0), "payload.max_tokens"),
        (ollama(messages=[{"role": "robot", "content": "x"}]), "payload.messages[0].role"),
        (ollama(messages=[{"role": "user", "content": ["x"]}]), "payload.messages[0].content"),
        (ollama(options={"num_predict": 5}), "payload.options.num_predict"),
        (ollama(options={"a": {"b": 1}}), "payload.options.a"),
        (ollama(options=[]), "payload.options"),
        (ollama(format="yaml"), "payload.format"),
        (ollama(format=3), "payload.format"),
        (ollama(stream=False), "payload.stream"),
        (ollama(keep_alive="5m"), "payload.keep_alive"),
    ],
)
def test_bad_ollama_requests_name_the_field(doc: object, path: str) -> None:
    assert refused("ollama.chat", doc).path == path


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1]", "JSON object"),
        (b"null", "JSON object"),
        (b'{"model": NaN}', "NaN"),
        (b'{"model": "a", "model": "b"}', "repeated key"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"a":' * 70 + b"1" + b"}" * 70, "nested"),
        (b"1" * 5000, "JSON"),
    ],
)
def test_malformed_bytes(raw: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_ai_payload("anthropic.messages", raw)
    assert info.value.path == "payload"
    assert fragment in info.value.message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    doc = anthropic(messages=[{"role": "user", "content": "[[[{{{" * 200 + '\\"'}])
    assert parse("anthropic.messages", doc).max_tokens == 256


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(PayloadError) as info:
        parse_ai_payload("echo", b"{}")
    assert info.value.path == "kind"
    with pytest.raises(PayloadError):
        parse_ai_payload(None, b"{}")  # type: ignore[arg-type]


def test_not_bytes_is_refused_cleanly() -> None:
    for value in (None, "text", 5, {"model": "x"}):
        with pytest.raises(PayloadError):
            parse_ai_payload("anthropic.messages", value)  # type: ignore[arg-type]


def _mutations(rng: random.Random, valid: bytes) -> bytes:
    choice = rng.randrange(5)
    data = bytearray(valid)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if choice == 1 and data:
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice == 2:
        return bytes(data[: rng.randrange(len(data) + 1)])
    if choice == 3:
        tokens = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"null", b"1e999", b"-0", b"\\u0000"]
        return b"".join(rng.choice(tokens) for _ in range(rng.randrange(60)))
    # Swap one value for a value of another JSON type.
    doc = json.loads(valid)
    key = rng.choice(sorted(doc))
    doc[key] = rng.choice([None, True, 1, -1, 1.5, "", "x", [], {}, [None], {"a": None}])
    return json.dumps(doc).encode()


def test_random_bytes_only_ever_raise_payload_error() -> None:
    rng = random.Random(8)
    samples = {
        "anthropic.messages": json.dumps(anthropic(system="s", temperature=0.1)).encode(),
        "claude-code": json.dumps(claude_code(allowed_tools=["Read"], max_turns=2)).encode(),
        "ollama.chat": json.dumps(ollama(options={"seed": 1})).encode(),
    }
    accepted = 0
    for _ in range(3000):
        kind = rng.choice(sorted(samples))
        data = _mutations(rng, samples[kind])
        try:
            parse_ai_payload(kind, data)
            accepted += 1
        except PayloadError as err:
            assert err.path.startswith("payload")
    assert accepted < 3000


SCHEMA = {
    "type": "object",
    "required": ["answer"],
    "properties": {"answer": {"type": "integer"}, "tags": {"type": "array"}},
}


def test_output_schema_round_trip() -> None:
    schema = parse_output_schema(json.dumps(SCHEMA))
    check_output(schema, b'{"answer": 42}')
    with pytest.raises(PayloadError) as info:
        check_output(schema, b'{"answer": "42"}')
    assert info.value.path == "output.answer"
    with pytest.raises(PayloadError) as info:
        check_output(schema, b"{}")
    assert info.value.path == "output" and "answer" in info.value.message
    with pytest.raises(PayloadError) as info:
        check_output(schema, b"the answer is 42")
    assert info.value.path == "output" and "not JSON" in info.value.message
    with pytest.raises(PayloadError):
        check_output(schema, b"\xff")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("", "output_schema"),
        ("{", "output_schema"),
        ("[]", "output_schema"),
        ('{"type": 5}', "output_schema.type"),
        ('{"properties": {"a": {"minimum": "x"}}}', "output_schema.properties.a.minimum"),
        ('{"$ref": "https://example.com/s.json"}', 'output_schema["$ref"]'),
        ('{"items": {"$ref": "other.json"}}', 'output_schema.items["$ref"]'),
        ("{" * 100 + "}" * 100, "output_schema"),
    ],
)
def test_bad_output_schemas(text: str, path: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_output_schema(text)
    assert info.value.path == path


def test_local_refs_work_and_nothing_is_fetched() -> None:
    schema = parse_output_schema(
        json.dumps(
            {"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
        )
    )
    check_output(schema, b'{"a": 1}')
    with pytest.raises(PayloadError) as info:
        check_output(schema, b'{"a": "x"}')
    assert info.value.path == "output.a"


def test_random_schemas_and_outputs_only_ever_raise_payload_error() -> None:
    rng = random.Random(9)
    keywords = ["type", "properties", "required", "items", "minimum", "enum", "anyOf", "$ref"]
    values: list[object] = [None, True, 0, -1, 2.5, "", "string", "#/x", [], {}, ["a"], {"a": {}}]
    checked = 0
    for _ in range(2000):
        schema_doc = {rng.choice(keywords): rng.choice(values) for _ in range(rng.randrange(4))}
        try:
            schema = parse_output_schema(json.dumps(schema_doc))
        except PayloadError as err:
            assert err.path.startswith("output_schema")
            assert "cannot be checked" not in err.message
            continue
        output = rng.choice(
            [json.dumps(rng.choice(values)).encode(), bytes(rng.randrange(256) for _ in range(8))]
        )
        try:
            check_output(schema, output)
            checked += 1
        except PayloadError as err:
            assert err.path.startswith(("output", "output_schema"))
            assert "cannot be checked" not in err.message
    assert checked > 0
    with pytest.raises(PayloadError):
        parse_output_schema(b"\xff")  # type: ignore[arg-type]
