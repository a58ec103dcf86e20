"""OpenAI-compatible routes: completions, chat completions (SSE streaming both ways),
models, and ``/generate`` (plain ``{prompt, lora_name}`` in, ``{text}`` out, no streaming).

Each route authenticates the caller, parses its body, checks the server's caps, asks the
``Service`` to resolve, admit and load (all before any generation), and shapes the OpenAI wire
format. A client that disconnects stops its generation (streams: Starlette cancels them;
otherwise ``unless_disconnected``). Headers: ``x-request-id``, ``x-loraplex-adapter`` and,
after a labelled fallback, ``x-loraplex-fallback: base``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from loraplex.engine.types import Delta, GenerationParams
from loraplex.errors import InvalidRequest, LoraplexError
from loraplex.server.auth import Caller
from loraplex.server.disconnect import unless_disconnected
from loraplex.server.limits import check_caps
from loraplex.server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from loraplex.server.service import Lease, Service, Target, new_request_id

router = APIRouter()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None


def _service(request: Request) -> Service:
    return request.app.state.service


def _headers(request_id: str, target: Target) -> dict[str, str]:
    headers = {"x-request-id": request_id, "x-loraplex-adapter": target.label}
    if target.fallback:
        headers["x-loraplex-fallback"] = "base"
    return headers


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def current_caller(request: Request) -> Caller:
    """The authenticated caller (401 without a valid key when auth is on)."""
    return await request.app.state.auth.caller(request)


async def _admitted(
    service: Service,
    caller: Caller,
    model: str,
    prompts: list[list[int]],
    params: list[GenerationParams],
) -> tuple[Target, Lease]:
    """Caps, resolution, tenant limits and a fair turn, then the adapter loaded."""
    max_tokens = max(p.max_tokens for p in params)
    check_caps(service.settings, [len(ids) for ids in prompts], max_tokens, params[0].n)
    adapter = await service.resolve(model, caller)
    lease = await service.admit(caller, prompts, params)
    try:
        return await service.target(adapter, lease.deadline), lease
    except BaseException:
        lease.release()
        raise


CallerDep = Annotated[Caller, Depends(current_caller)]


def _params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, caller: Caller
) -> GenerationParams:
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        n=body.n,
        ignore_eos=body.ignore_eos,
        cache_salt=caller.cache_salt,
    )


async def _collect(deltas: AsyncIterator[Delta], n: int) -> list[_Choice]:
    choices = [_Choice() for _ in range(n)]
    async for delta in deltas:
        choice = choices[delta.index]
        choice.text.append(delta.text)
        choice.tokens += delta.token_count
        choice.cached_tokens = max(choice.cached_tokens, delta.cached_tokens)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
    return choices


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse_stream(
    deltas: AsyncIterator[Delta],
    chunk: Callable[[Delta], dict[str, Any]],
    usage_chunk: Callable[[int, int], dict[str, Any]] | None,
    lease: Lease,
) -> AsyncIterator[str]:
    """Deltas as SSE events, an optional usage event, then ``[DONE]``; errors as an event."""
    completion_tokens = cached_tokens = 0
    try:
        async for delta in deltas:
            completion_tokens += delta.token_count
            cached_tokens = max(cached_tokens, delta.cached_tokens)
            if delta.text or delta.finish_reason:
                yield _sse(chunk(delta))
    except LoraplexError as exc:
        yield _sse({"error": {"message": exc.message, "type": exc.error_type, "code": exc.code}})
    finally:
        lease.release()
    if usage_chunk is not None:
        yield _sse(usage_chunk(completion_tokens, cached_tokens))
    yield _sse("[DONE]")


def _event_stream(events: AsyncIterator[str], headers: dict[str, str], lease: Lease) -> Any:
    """The SSE response; the lease is released even if the stream never starts."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers=headers,
        background=BackgroundTask(lease.release),
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, caller: CallerDep) -> Any:
    """OpenAI text completions for one or more prompts."""
    service = _service(request)
    if len(body.prompts()) > service.settings.max_prompts:
        raise InvalidRequest(
            f"This request has {len(body.prompts())} prompts; the limit is "
            f"{service.settings.max_prompts}."
        )
    prompts = [service.prompts.completion(p) for p in body.prompts()]
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("Streaming takes one prompt; send a list of prompts without stream.")
    params = [
        _params(body, service.prompts.budget(ids, body.max_tokens), caller) for ids in prompts
    ]
    target, lease = await _admitted(service, caller, body.model, prompts, params)
    request_id = new_request_id("cmpl")
    created = int(time.time())
    base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
    headers = _headers(request_id, target)

    if body.stream:
        deltas = service.generate(prompts[0], params[0], request_id, target, lease)

        def chunk(delta: Delta) -> dict[str, Any]:
            choice = {
                "index": delta.index,
                "text": delta.text,
                "logprobs": None,
                "finish_reason": delta.finish_reason,
            }
            return {**base, "choices": [choice]}

        def usage(tokens: int, cached: int) -> dict[str, Any]:
            prompt_tokens = len(prompts[0]) * body.n
            return {**base, "choices": [], "usage": _usage(prompt_tokens, tokens, cached)}

        events = _sse_stream(deltas, chunk, usage if body.include_usage else None, lease)
        return _event_stream(events, headers, lease)

    collects = [
        asyncio.ensure_future(
            _collect(service.generate(ids, p, f"{request_id}-{i}", target, lease), body.n)
        )
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
    ]
    try:
        results = await unless_disconnected(request, asyncio.gather(*collects))
    finally:
        for collect in collects:  # one failed: stop the others before their seats are freed
            collect.cancel()
        await asyncio.gather(*collects, return_exceptions=True)
        lease.release()
    choices = [
        {
            "index": i * body.n + j,
            "text": "".join(c.text),
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for i, result in enumerate(results)
        for j, c in enumerate(result)
    ]
    completion_tokens = sum(c.tokens for result in results for c in result)
    prompt_tokens = sum(len(ids) for ids in prompts) * body.n
    cached = sum(max(c.cached_tokens for c in result) for result in results)
    usage = _usage(prompt_tokens, completion_tokens, cached)
    payload = {**base, "choices": choices, "usage": usage}
    return _json(payload, headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: CallerDep) -> Any:
    """OpenAI chat completions, rendered with the base model's chat template."""
    service = _service(request)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise InvalidRequest(f"messages: {exc}") from exc
    prompt_ids = service.prompts.chat(messages)
    params = _params(body, service.prompts.budget(prompt_ids, body.token_budget()), caller)
    target, lease = await _admitted(service, caller, body.model, [prompt_ids], [params])
    request_id = new_request_id("chatcmpl")
    created = int(time.time())
    base = {"id": request_id, "created": created, "model": body.model}
    headers = _headers(request_id, target)
    deltas = service.generate(prompt_ids, params, request_id, target, lease)

    if body.stream:
        started: set[int] = set()

        def chunk(delta: Delta) -> dict[str, Any]:
            content: dict[str, str] = {"content": delta.text}
            if delta.index not in started:
                started.add(delta.index)
                content = {"role": "assistant", **content}
            choice = {
                "index": delta.index,
                "delta": content,
                "logprobs": None,
                "finish_reason": delta.finish_reason,
            }
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        def usage(tokens: int, cached: int) -> dict[str, Any]:
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": _usage(len(prompt_ids) * body.n, tokens, cached),
            }

        events = _sse_stream(deltas, chunk, usage if body.include_usage else None, lease)
        return _event_stream(events, headers, lease)

    try:
        result = await unless_disconnected(request, _collect(deltas, body.n))
    finally:
        lease.release()
    choices = [
        {
            "index": j,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for j, c in enumerate(result)
    ]
    cached = max(c.cached_tokens for c in result)
    usage = _usage(len(prompt_ids) * body.n, sum(c.tokens for c in result), cached)
    payload = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
    return _json(payload, headers)


@router.get("/v1/models")
async def models(request: Request, caller: CallerDep) -> dict[str, Any]:
    """The base model and the adapters this caller may use."""
    service = _service(request)
    names = [service.base_name, *await asyncio.to_thread(service.source.names, caller.may_use)]
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "loraplex",
            "parent": None if name == service.base_name else service.base_name,
        }
        for name in names
    ]
    return {"object": "list", "data": data}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, caller: CallerDep) -> Any:
    """``{prompt, lora_name, max_tokens, temperature} -> {text}`` for the original clients."""
    service = _service(request)
    prompt_ids = service.prompts.completion(body.prompt)
    params = GenerationParams(
        max_tokens=service.prompts.budget(prompt_ids, body.max_tokens),
        temperature=body.temperature,
        cache_salt=caller.cache_salt,
    )
    model = body.lora_name or service.base_name
    target, lease = await _admitted(service, caller, model, [prompt_ids], [params])
    request_id = new_request_id("gen")
    try:
        deltas = service.generate(prompt_ids, params, request_id, target, lease)
        (choice,) = await unless_disconnected(request, _collect(deltas, 1))
    finally:
        lease.release()
    return _json({"text": "".join(choice.text)}, _headers(request_id, target))


def _json(payload: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(payload, headers=headers)
