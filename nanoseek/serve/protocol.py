"""The OpenAI wire format the server speaks: request models and the error body.

    body = ChatRequest.model_validate(json)          # what FastAPI does for each endpoint
    unknown_fields(body)                              # ["messages.0.audio", ...]: a 400 unless ignored
    error_response(400, "max_tokens: must be >= 1", param="max_tokens")

Validation follows OpenAI's server, not Python's defaults: a wrong type is a 400 that names the
field, a string is never a number ("5" is refused), but an integral float is an integer
(``n: 1.0``), as in OpenAI's API. Every text field refuses lone UTF-16 surrogates (JSON allows
"\\ud800"; no tokenizer can encode it) and has a length bound, so one request cannot hold the
server. Fields the server does not know are kept (``extra="allow"``) so that the API can name
them all in one 400 (or ignore them with ``--ignore-unknown-fields``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_TEXT = 1 << 20  # characters in one message or prompt (the body limit bounds the sum)


def _integral(v):
    """OpenAI's coercion: 1.0 is the integer 1 (a bool or a string is never an integer)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _no_surrogates(v):
    """Refuse text that UTF-8 cannot hold (a lone surrogate); walks dicts and lists too."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone UTF-16 surrogate (not valid Unicode text)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_surrogates(k)
            _no_surrogates(x)
    elif isinstance(v, list):
        for x in v:
            _no_surrogates(x)
    return v


def Text(max_length: int = MAX_TEXT, min_length: int = 0):
    return Annotated[StrictStr, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_surrogates)]


Int = Annotated[StrictInt, BeforeValidator(_integral)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
JSONObject = Annotated[dict[str, Any], AfterValidator(_no_surrogates)]
Temperature = Annotated[Number, Field(ge=0, le=2)]
TopP = Annotated[Number, Field(gt=0, le=1)]
TopK = Annotated[Int, Field(ge=-1)]  # vLLM's extension; -1 or 0: no top-k filter
Penalty = Annotated[Number, Field(ge=-2, le=2)]
MaxTokens = Annotated[Int, Field(ge=1)]
StopText = Text(1000, 1)  # checked after every token: bounded
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
Seed = Annotated[Int, Field(ge=-(2**63), lt=2**63)]  # what torch.Generator.manual_seed takes, + n
TokenId = Annotated[Int, Field(ge=0, lt=2**31)]
FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(Model):
    type: Literal["text"]
    text: Text()


class ImageURL(Model):
    url: Text(64 << 20, 1)  # a data: URL (the request-body limit bounds it first)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; DeepSeek-VL has one resolution


class ImagePart(Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(Model):
    name: FunctionName
    arguments: Text()  # JSON text, as OpenAI sends it


class ToolCall(Model):
    id: Text(256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text() | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: Text(64) | None = None
    reasoning_content: Text() | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Text(256) | None = None


class StreamOptions(Model):
    include_usage: StrictBool = False


class FunctionDef(Model):
    name: FunctionName
    description: Text(10_000) | None = None
    parameters: JSONObject | None = None
    strict: StrictBool | None = None


class Tool(Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Model):
    name: FunctionName


class NamedToolChoice(Model):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Model):
    name: Text(64) = "response"
    description: Text(10_000) | None = None
    schema_: JSONObject | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class RequestBase(Model):
    """Fields shared by both endpoints."""
    model: Text(256)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    n: Annotated[Int, Field(ge=1, le=16)] = 1
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None  # vLLM's: each id stops
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text(256) | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] = 1.0
    logit_bias: Annotated[dict[Annotated[StrictStr, Field(pattern=r"^\d{1,10}$")],
                               Annotated[Number, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    min_tokens: Annotated[Int, Field(ge=0)] = 0
    response_format: ResponseFormat | None = None


class ChatRequest(RequestBase):
    messages: Annotated[list[Message], Field(min_length=1, max_length=2048)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    max_thinking_tokens: Annotated[Int, Field(ge=0)] | None = None  # reasoning budget, then </think>
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: JSONObject | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False


class CompletionRequest(RequestBase):
    prompt: (Text() | Annotated[list[Text()], Field(min_length=1, max_length=16)]
             | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT)]],
                         Field(min_length=1, max_length=16)])
    suffix: Text() | None = None
    max_tokens: Annotated[Int, Field(ge=0)] | None = 16  # OpenAI's default; 0 only with echo
    echo: StrictBool = False
    logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[Int, Field(ge=1, le=16)] | None = None


# fields of OpenAI's API that this server knows and does not implement (named as such in the 400)
UNSUPPORTED = {"functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
               "service_tier", "store", "metadata", "verbosity", "safety_identifier", "prompt_cache_key"}


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """Dotted paths of every field the request sent that the models do not define."""
    found = [f"{path}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            if isinstance(v, BaseModel):
                sub = f"{path}{name}.{i}." if isinstance(value, list) else f"{path}{name}."
                found += unknown_fields(v, sub)
    return found


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union reports every branch it tried; its first type name is noise for the reader
    param = ".".join(x for x in loc if not x[:1].isupper() and "[" not in x and not x.startswith("function-"))
    return f"{param or 'body'}: {e.get('msg', 'invalid value')}", param or None
