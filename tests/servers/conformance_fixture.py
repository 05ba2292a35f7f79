"""The server the official MCP conformance suite expects, written on the Python SDK's `MCPServer`.

Run as ``python -m tests.servers.conformance_fixture --port N``; it serves streamable HTTP on
``http://127.0.0.1:N/mcp``. Every tool, resource and prompt name below is the one a server
scenario of ``@modelcontextprotocol/conformance@0.2.0-alpha.12`` calls (``--requirements
2025-11-25``), checked against the suite's scenario sources (src/scenarios/server/*.ts) and the
names in the published package's dist. tools/conformance.sh runs the suite against it, directly
and through the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import struct
import wave
import zlib
from typing import Any

import mcp_types
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Message, UserMessage

from tests.servers.sdk_server import MemoryEventStore

_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def _png_red_pixel() -> str:
    """A 1×1 red PNG, built here rather than pasted as an opaque blob."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1×1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte, then one red pixel
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def _wav_silence() -> str:
    """A tenth of a second of 8 kHz mono silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(8000)
        out.writeframes(b"\x80" * 800)
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png_red_pixel()
WAV = _wav_silence()


class LogLevels:
    """The level each session asked for with ``logging/setLevel``; unset means everything."""

    def __init__(self) -> None:
        self._by_session: dict[int, int] = {}

    def set(self, session: object, level: str) -> None:
        self._by_session[id(session)] = _LEVELS.index(level)

    def allows(self, session: object, level: str) -> bool:
        return _LEVELS.index(level) >= self._by_session.get(id(session), 0)


RETRY_MS = 200
"""The reconnection delay the fixture suggests in its priming events (SEP-1699)."""

JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}
"""The input schema scenario `json-schema-2020-12` expects verbatim (SEP-1613, SEP-2106)."""


class ConformanceServer(MCPServer[object]):
    """`MCPServer` that lists one tool with a hand-written JSON Schema 2020-12 input schema.

    The SDK derives input schemas from signatures; the scenario needs keywords no signature makes.
    """

    async def list_tools(self) -> list[mcp_types.Tool]:
        return [
            tool.model_copy(update={"input_schema": JSON_SCHEMA_2020_12})
            if tool.name == "json_schema_2020_12_tool"
            else tool
            for tool in await super().list_tools()
        ]


def build_server() -> MCPServer[object]:
    server = ConformanceServer("fsm-hub-conformance-fixture", version="1.0.0", log_level="WARNING")
    levels = LogLevels()
    subscriptions: set[str] = set()

    async def log(ctx: Context, level: mcp_types.LoggingLevel, text: str) -> None:
        if levels.allows(ctx.session, level):
            await ctx.session.send_log_message(  # pyright: ignore[reportDeprecated]
                level=level, data=text, logger="conformance-fixture", related_request_id=ctx.request_id
            )

    # --- tools -------------------------------------------------------------------------------

    @server.tool()
    def test_simple_text() -> str:
        """Returns one text block."""
        return "This is a simple text response for testing."

    @server.tool()
    def test_image_content() -> list[mcp_types.ContentBlock]:
        """Returns a 1x1 red PNG."""
        return [mcp_types.ImageContent(type="image", data=PNG, mime_type="image/png")]

    @server.tool()
    def test_audio_content() -> list[mcp_types.ContentBlock]:
        """Returns a short WAV clip."""
        return [mcp_types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")]

    @server.tool()
    def test_embedded_resource() -> list[mcp_types.ContentBlock]:
        """Returns an embedded text resource."""
        resource = mcp_types.TextResourceContents(
            uri="test://embedded-resource",
            mime_type="text/plain",
            text="This is an embedded resource content.",
        )
        return [mcp_types.EmbeddedResource(type="resource", resource=resource)]

    @server.tool()
    def test_multiple_content_types() -> list[mcp_types.ContentBlock]:
        """Returns text, an image and an embedded resource."""
        resource = mcp_types.TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text='{"test":"data","value":123}',
        )
        return [
            mcp_types.TextContent(type="text", text="Multiple content types test:"),
            mcp_types.ImageContent(type="image", data=PNG, mime_type="image/png"),
            mcp_types.EmbeddedResource(type="resource", resource=resource),
        ]

    @server.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Sends three info log notifications while it runs."""
        await log(ctx, "info", "Tool execution started")
        await asyncio.sleep(0.05)
        await log(ctx, "info", "Tool processing data")
        await asyncio.sleep(0.05)
        await log(ctx, "info", "Tool execution completed")
        return "Tool with logging executed successfully"

    @server.tool()
    def test_error_handling() -> mcp_types.CallToolResult:
        """Always answers with an isError result."""
        text = mcp_types.TextContent(type="text", text="This tool intentionally returns an error for testing")
        return mcp_types.CallToolResult(content=[text], is_error=True)

    @server.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Reports progress 0, 50, 100 of 100 when the request carries a progress token."""
        for step, progress in enumerate((0, 50, 100)):
            if step:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress, 100, f"step {step + 1} of 3")
        return "Tool with progress executed successfully"

    @server.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Asks the client to sample an answer to `prompt`."""
        message = mcp_types.SamplingMessage(
            role="user", content=mcp_types.TextContent(type="text", text=prompt)
        )
        result = await ctx.session.create_message(
            messages=[message], max_tokens=100, related_request_id=ctx.request_id
        )
        content = result.content
        text = content.text if isinstance(content, mcp_types.TextContent) else str(content)
        return f"LLM response: {text}"

    @server.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Asks the client for a username and an email."""
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        return await _elicit(ctx, message, schema, "User response")

    @server.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Elicits a form whose primitive fields all carry defaults (SEP-1034)."""
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active",
                },
                "verified": {"type": "boolean", "description": "Verification status", "default": True},
            },
            "required": [],
        }
        return await _elicit(ctx, "Please review and update the form fields with defaults", schema)

    @server.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Elicits a form with the five enum shapes of SEP-1330."""
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                "untitledSingle": {
                    "type": "string",
                    "description": "Select one option",
                    "enum": ["option1", "option2", "option3"],
                },
                "titledSingle": {
                    "type": "string",
                    "description": "Select one option with titles",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "description": "Select one option (legacy)",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {
                    "type": "array",
                    "description": "Select multiple options",
                    "minItems": 1,
                    "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                },
                "titledMulti": {
                    "type": "array",
                    "description": "Select multiple options with titles",
                    "minItems": 1,
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
            "required": [],
        }
        return await _elicit(ctx, "Please select options from the enum fields", schema)

    @server.tool()
    def json_schema_2020_12_tool(
        name: str | None = None,
        address: dict[str, str] | None = None,
        contactMethod: str | None = None,
        phone: str | None = None,
        email: str | None = None,
    ) -> str:
        """Tool with JSON Schema 2020-12 features"""
        return f"received name={name}, contactMethod={contactMethod}"

    @server.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Closes its SSE stream mid-call; the result arrives after the client resumes (SEP-1699)."""
        await ctx.close_sse_stream()
        await asyncio.sleep(RETRY_MS * 2 / 1000)
        return "Reconnection test completed"

    async def _elicit(ctx: Context, message: str, schema: dict[str, Any], label: str = "") -> str:
        # A raw schema, not `ctx.elicit(model)`: the SDK's model route cannot express the enum shapes.
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        if label:
            return f"{label}: action={result.action}, content={result.content}"
        return f"Elicitation completed: action={result.action}, content={result.content}"

    # --- resources ---------------------------------------------------------------------------

    @server.resource(
        "test://static-text", name="static-text", description="A static text resource", mime_type="text/plain"
    )
    def static_text() -> str:
        return "This is the content of the static text resource."

    @server.resource(
        "test://static-binary",
        name="static-binary",
        description="A static binary resource",
        mime_type="image/png",
    )
    def static_binary() -> bytes:
        return base64.b64decode(PNG)

    @server.resource(
        "test://template/{id}/data",
        name="template-data",
        description="A resource template with an id parameter",
        mime_type="application/json",
    )
    def template_data(id: str) -> str:
        return f'{{"id":"{id}","templateTest":true,"data":"Data for ID: {id}"}}'

    @server.resource(
        "test://watched-resource",
        name="watched-resource",
        description="A resource clients can subscribe to",
        mime_type="text/plain",
    )
    def watched_resource() -> str:
        return "Watched resource content"

    async def subscribe(
        ctx: ServerRequestContext[Any], params: mcp_types.SubscribeRequestParams
    ) -> mcp_types.EmptyResult:
        subscriptions.add(str(params.uri))
        return mcp_types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any], params: mcp_types.UnsubscribeRequestParams
    ) -> mcp_types.EmptyResult:
        subscriptions.discard(str(params.uri))
        return mcp_types.EmptyResult()

    async def set_level(
        ctx: ServerRequestContext[Any], params: mcp_types.SetLevelRequestParams
    ) -> mcp_types.EmptyResult:
        levels.set(ctx.session, params.level)
        return mcp_types.EmptyResult()

    lowlevel = server._lowlevel_server  # the SDK has no public hook for these three methods
    lowlevel.add_request_handler("resources/subscribe", mcp_types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", mcp_types.UnsubscribeRequestParams, unsubscribe)
    lowlevel.add_request_handler("logging/setLevel", mcp_types.SetLevelRequestParams, set_level)

    # --- prompts -----------------------------------------------------------------------------

    @server.prompt()
    def test_simple_prompt() -> str:
        """A prompt without arguments."""
        return "This is a simple prompt for testing."

    @server.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        """A prompt with two required arguments."""
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @server.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
        """A prompt that embeds the resource named by its argument."""
        resource = mcp_types.TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            UserMessage(mcp_types.EmbeddedResource(type="resource", resource=resource)),
            UserMessage("Please process the embedded resource above."),
        ]

    @server.prompt()
    def test_prompt_with_image() -> list[Message]:
        """A prompt that carries an image."""
        return [
            UserMessage(mcp_types.ImageContent(type="image", data=PNG, mime_type="image/png")),
            UserMessage("Please analyze the image above."),
        ]

    @server.completion()  # type: ignore[untyped-decorator,no-untyped-call]  # the SDK leaves it untyped
    async def complete(
        ref: mcp_types.PromptReference | mcp_types.ResourceTemplateReference,
        argument: mcp_types.CompletionArgument,
        context: mcp_types.CompletionContext | None,
    ) -> mcp_types.Completion:
        choices = ["paris", "park", "party"] if argument.name == "arg1" else []
        values = [choice for choice in choices if choice.startswith(argument.value)]
        return mcp_types.Completion(values=values, total=len(values), has_more=False)

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    build_server().run(
        "streamable-http",
        host=args.host,
        port=args.port,
        event_store=MemoryEventStore(),
        retry_interval=RETRY_MS,
    )


if __name__ == "__main__":
    main()
