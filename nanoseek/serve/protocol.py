"""The OpenAI wire format the server speaks: request models (validated strictly by pydantic, so a
wrong type is a 400 that names the field) and the error body.

    body = ChatRequest.model_validate(json)          # what FastAPI does for each endpoint
    error_response(400, "max_tokens: must be >= 1", param="max_tokens")
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Temperature = Annotated[float, Field(strict=True, ge=0, le=2)]
TopP = Annotated[float, Field(strict=True, gt=0, le=1)]
TopK = Annotated[StrictInt, Field(ge=-1)]  # vLLM's extension; -1 or 0: no top-k filter
MaxTokens = Annotated[StrictInt, Field(ge=1)]
StopText = Annotated[StrictStr, Field(min_length=1, max_length=1000)]  # checked after every token: bounded
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]  # what torch.Generator.manual_seed takes, + n


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    reasoning_content: StrictStr | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class RequestBase(BaseModel):
    """Fields shared by both endpoints (unknown fields are ignored, as OpenAI's SDKs send extras)."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: Stop = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)


class ChatRequest(RequestBase):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(RequestBase):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=16)]
    suffix: StrictStr | None = None
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    echo: StrictBool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union reports every branch it tried; its first type name is noise for the reader
    param = ".".join(x for x in loc if not x[:1].isupper() and "[" not in x) or None
    return f"{param or 'body'}: {e.get('msg', 'invalid value')}", param
