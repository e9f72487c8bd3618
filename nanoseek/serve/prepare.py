"""From a validated request to the work the scheduler runs: prompt ids and SamplingParams per
choice. Runs in a worker thread (template rendering, tokenization and grammar compilation can
take a while for a big request; the event loop, /health and every stream go on meanwhile).

    job = prepare_chat(ctx, body)          # or prepare_completion(ctx, body)
    job.runs                               # [(prompt ids, SamplingParams)], one per choice to run

Reasoning budgets: `max_thinking_tokens` in the body, else `reasoning_effort` (minimal 0, low
512, medium 2048, high unbounded), else the server's --max-thinking-tokens. They apply only when
the prompt opened <think>; the guide then closes the reasoning when the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat import chat_prompt
from ..inference import SamplingParams
from ..inference.constrain import Grammar, GuideFactory
from ..tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE
from .protocol import APIError, ChatRequest, CompletionRequest, RequestBase
from .tools import call_grammar, for_builtin_template

EFFORT_BUDGET = {"minimal": 0, "low": 512, "medium": 2048, "high": None}


@dataclass
class Context:
    """What preparing a request needs from the server."""
    tokenizer: object
    context: int  # tokens per slot
    eos: set[int]
    vocab_size: int  # the model's (its embedding may have more rows than the tokenizer has tokens)
    default_thinking_budget: int | None = None
    images: object = None  # serve.images.ImagePolicy when the model has vision towers


@dataclass
class Job:
    runs: list = field(default_factory=list)  # (prompt ids, SamplingParams) per run
    choice_prompt: list[int] = field(default_factory=list)  # which prompt each run answers
    prompts: list[list[int]] = field(default_factory=list)
    echo: list[str] | None = None  # prompt texts to put before each choice's text
    inside: bool = False  # the chat prompt opened <think>
    tools: bool = False  # parse tool calls out of the answer
    n: int = 1  # choices per prompt returned (best_of runs may be more)
    drop_output: bool = False  # max_tokens 0 with echo: only the prompt comes back
    want_logprobs: bool = False  # the client asked for log-probs (best_of records them anyway)
    images: object = None  # [n, D] image tokens for the chat prompt's <image_placeholder> ids


def _max_tokens(ctx: Context, prompt: list[int], wanted: int | None, param: str) -> int:
    room = ctx.context - len(prompt)
    if room < 1 or (wanted is not None and wanted > room):
        raise APIError(400, f"this model's context is {ctx.context} tokens; the prompt has {len(prompt)} "
                       f"and max_tokens={wanted} would need {len(prompt) + (wanted or 1)}",
                       param=param, code="context_length_exceeded")
    return wanted or room


def _params(ctx: Context, body: RequestBase, max_tokens: int, i: int, **kw) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = None if body.seed is None else body.seed + i  # n choices differ but stay reproducible
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    if any(t >= ctx.vocab_size for t in bias):
        raise APIError(400, f"logit_bias: a token id is outside the vocabulary of {ctx.vocab_size}",
                       param="logit_bias")
    return SamplingParams(max_tokens, body.temperature, top_k, body.top_p, seed, stop,
                          [[t] for t in body.stop_token_ids or []], body.ignore_eos, min_p=body.min_p or None,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty, logit_bias=bias, min_tokens=body.min_tokens,
                          **kw)


def _response_grammar(tok, body: RequestBase) -> Grammar | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return Grammar.json_object(tok)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return Grammar.json_schema(tok, fmt.json_schema.schema_)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None


def _content(ctx: Context, m, i: int, images: list):
    """A message's content for chat_prompt: text, or text pieces and each image's placeholder ids."""
    if m.content is None or isinstance(m.content, str):
        return m.content
    if all(p.type == "text" for p in m.content):
        return "".join(p.text for p in m.content)
    if ctx.images is None:
        raise APIError(400, "this model has no vision towers; image_url parts are not accepted",
                       param=f"messages.{i}.content")
    pieces = []
    for j, p in enumerate(m.content):
        if p.type == "text":
            pieces.append(p.text)
            continue
        if len(images) >= ctx.images.limits.max_images:
            raise APIError(400, f"more than {ctx.images.limits.max_images} images in one request",
                           param=f"messages.{i}.content.{j}")
        images.append(ctx.images.read(p.image_url.url, where=f"messages.{i}.content.{j}"))
        pieces.append(ctx.images.engine.image_slots())
    return pieces


def _messages(ctx: Context, body: ChatRequest, images: list) -> list[dict]:
    out = []
    for i, m in enumerate(body.messages):
        content = _content(ctx, m, i, images)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump(exclude_unset=False) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if msg["content"] is None and not m.tool_calls:
            raise APIError(400, "a message without tool_calls needs content", param="messages")
        out.append(msg)
    return out


def prepare_chat(ctx: Context, body: ChatRequest) -> Job:
    tok = ctx.tokenizer
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if choice != "none" and not body.tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or []]
    if not isinstance(choice, str):
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    images: list = []
    messages, kwargs = _messages(ctx, body, images), dict(body.chat_template_kwargs or {})
    offered = tools if choice != "none" else None
    if tok.own_template is not None:
        kwargs["tools"] = offered
    else:
        messages = for_builtin_template(messages, offered)
    try:
        ids, inside = chat_prompt(tok, messages, body.add_generation_prompt, body.continue_final_message, **kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="messages") from None
    if choice == "required" or not isinstance(choice, str):
        grammar = Grammar.lark(tok, call_grammar(tok, tools, body.parallel_tool_calls))
    else:
        grammar = _response_grammar(tok, body)
    budget = body.max_thinking_tokens
    if budget is None:
        budget = EFFORT_BUDGET[body.reasoning_effort] if body.reasoning_effort else ctx.default_thinking_budget
    guide = None
    if grammar is not None or (inside and budget is not None):
        try:
            guide = GuideFactory(tok, grammar, inside, budget if inside else None, eos=ctx.eos)
        except ValueError as e:
            raise APIError(400, str(e), param="max_thinking_tokens") from None
    max_tokens = _max_tokens(ctx, ids, body.max_completion_tokens or body.max_tokens, "messages")
    lp = body.top_logprobs or 0 if body.logprobs else None
    runs = [(ids, _params(ctx, body, max_tokens, i, logprobs=lp, guide=guide)) for i in range(body.n)]
    tokens = ctx.images.engine.encode_images(images) if images else None  # the towers, once per image
    return Job(runs, [0] * body.n, [ids], inside=inside, tools=choice != "none", n=body.n,
               want_logprobs=body.logprobs, images=tokens)


def prepare_completion(ctx: Context, body: CompletionRequest) -> Job:
    tok = ctx.tokenizer
    p = body.prompt
    if isinstance(p, str):
        texts, token_prompts = [p], None
    elif isinstance(p[0], str):
        texts, token_prompts = p, None
    else:
        token_prompts = [p] if isinstance(p[0], int) else p
        if any(t >= ctx.vocab_size for ids in token_prompts for t in ids):
            raise APIError(400, f"prompt: a token id is outside the vocabulary of {ctx.vocab_size}", param="prompt")
        texts = [tok.decode(ids) for ids in token_prompts]
    if body.suffix is not None and (body.echo or token_prompts is not None):
        raise APIError(400, "suffix cannot be combined with echo or token prompts", param="suffix")
    bos = tok.bos_token if tok.bos_id is not None else ""
    if token_prompts is not None:
        encoded = token_prompts
    elif body.suffix is not None:  # fill in the middle: PSM layout, the model writes the middle
        encoded = [tok.encode(f"{bos}{FIM_BEGIN}{t}{FIM_HOLE}{body.suffix}{FIM_END}") for t in texts]
    else:
        encoded = [tok.encode(bos + t) for t in texts]
    if any(not ids for ids in encoded):
        raise APIError(400, "the prompt is empty and the tokenizer has no BOS token to start from", param="prompt")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo (only the prompt would come back)", param="max_tokens")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise APIError(400, f"best_of={best_of} must be >= n={body.n}", param="best_of")
    if best_of > body.n and body.stream:
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    grammar = _response_grammar(tok, body)
    guide = GuideFactory(tok, grammar, eos=ctx.eos) if grammar is not None else None
    lp = body.logprobs if body.logprobs is not None else (0 if best_of > body.n else None)
    job = Job(prompts=encoded, echo=texts if body.echo else None, n=body.n, drop_output=body.max_tokens == 0,
              want_logprobs=body.logprobs is not None)
    for k, ids in enumerate(encoded):
        max_tokens = _max_tokens(ctx, ids, body.max_tokens or (1 if body.max_tokens == 0 else None), "prompt")
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        for j in range(best_of):
            job.runs.append((ids, _params(ctx, body, max_tokens, j, logprobs=lp, prompt_logprobs=prompt_lp,
                                          guide=guide)))
            job.choice_prompt.append(k)
    return job
