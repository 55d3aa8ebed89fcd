"""AI task kinds shared by the server and the agent: payload schemas and output checks.

The server validates at Submit and the agent again before calling a provider,
with the same code, so a bad request is refused with the same field path on
both sides. Nothing here imports ``server`` or ``agent``.
"""

from muster.ai.payloads import (
    AI_KINDS,
    CLAUDE_CODE_DEFAULT_MAX_TURNS,
    PROVIDERS,
    AiRequest,
    PayloadError,
    PayloadLimits,
    check_output,
    parse_ai_payload,
    parse_output_schema,
)

__all__ = [
    "AI_KINDS",
    "CLAUDE_CODE_DEFAULT_MAX_TURNS",
    "PROVIDERS",
    "AiRequest",
    "PayloadError",
    "PayloadLimits",
    "check_output",
    "parse_ai_payload",
    "parse_output_schema",
]
