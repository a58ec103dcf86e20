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

from loraplex.adapters import ModelCard, ResolvedAdapter
from loraplex.engine.types import Delta, GenerationParams, TokenLogprob
from loraplex.errors import InvalidRequest, LoraplexError
from loraplex.server.auth import Caller
from loraplex.server.disconnect import unless_disconnected
from loraplex.server.errors import error_event
from loraplex.server.limits import check_caps
from loraplex.server.logprobs import ChoiceLogprobs, chat_logprobs
from loraplex.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    unsupported,
)
from loraplex.server.service import Lease, Service, Target, new_request_id

router = APIRouter()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


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
    return await _admitted_resolved(service, caller, adapter, prompts, params)


async def _admitted_resolved(
    service: Service,
    caller: Caller,
    adapter: ResolvedAdapter | None,
    prompts: list[list[int]],
    params: list[GenerationParams],
) -> tuple[Target, Lease]:
    """Tenant limits and a fair turn for an adapter already resolved, then it loaded."""
    lease = await service.admit(caller, prompts, params, adapter)
    try:
        return await service.target(adapter, lease.deadline), lease
    except BaseException:
        lease.release()
        raise


CallerDep = Annotated[Caller, Depends(current_caller)]


def _params(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    caller: Caller,
    **extra: Any,
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
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        top_k=body.top_k,
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.logit_bias,
        **extra,
    )


def _check_logprobs(service: Service, asked: int | None, param: str) -> None:
    """400 when a request asks more alternatives per token than the server allows."""
    limit = service.settings.max_logprobs
    if asked is not None and asked > limit:
        raise unsupported(param, f"{asked} asked; this server's limit is {limit}")


async def _collect(deltas: AsyncIterator[Delta], n: int) -> list[_Choice]:
    choices = [_Choice() for _ in range(n)]
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    async for delta in deltas:
        choice = choices[delta.index]
        choice.text.append(delta.text)
        choice.tokens += delta.token_count
        choice.cached_tokens = max(choice.cached_tokens, delta.cached_tokens)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        choice.logprobs.extend(delta.logprobs or ())
        prompt_logprobs = delta.prompt_logprobs or prompt_logprobs
    for choice in choices:
        choice.prompt_logprobs = prompt_logprobs
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
            if delta.text or delta.finish_reason or delta.logprobs or delta.prompt_logprobs:
                yield _sse(chunk(delta))
    except LoraplexError as exc:
        yield error_event(exc)
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


def _prompt(service: Service, prompt: str | list[int]) -> tuple[list[int], str]:
    """Token ids and text of one completions prompt (a string or token ids)."""
    if isinstance(prompt, str):
        return service.prompts.completion(prompt), prompt
    vocab = len(service.prompts.tokenizer)
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise unsupported("prompt", f"token ids must be a non-empty list within 0..{vocab - 1}")
    return list(prompt), service.prompts.tokenizer.decode(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, caller: CallerDep) -> Any:
    """OpenAI text completions for one or more prompts (``echo``: prompt text and logprobs;
    ``echo`` with ``max_tokens=0``: score the prompt, generate nothing)."""
    service = _service(request)
    if len(body.prompts()) > service.settings.max_prompts:
        raise InvalidRequest(
            f"This request has {len(body.prompts())} prompts; the limit is "
            f"{service.settings.max_prompts}.",
            param="prompt",
        )
    _check_logprobs(service, body.logprobs, "logprobs")
    parsed = [_prompt(service, p) for p in body.prompts()]
    prompts = [ids for ids, _ in parsed]
    if body.stream and len(prompts) > 1:
        raise InvalidRequest(
            "Streaming takes one prompt; send a list of prompts without stream.", param="prompt"
        )
    scoring = body.scoring_only
    echo_logprobs = body.logprobs if body.echo else None
    if echo_logprobs is not None and service.settings.fast_lora == "off":
        # vLLM's stock CPU LoRA ops fail prompt logprobs beside other requests, and the
        # engine with them (tests/integration/test_fastlora_equality.py).
        raise InvalidRequest(
            "echo with logprobs (prompt log-probabilities) needs loraplex's fast LoRA ops; "
            "this server runs with LORAPLEX_FAST_LORA=off.",
            param="echo",
        )
    params = [
        _params(
            body,
            service.prompts.budget(ids, 1 if scoring else body.max_tokens),  # scoring: 1, dropped
            caller,
            logprobs=body.logprobs,
            prompt_logprobs=echo_logprobs,
        )
        for ids in prompts
    ]
    target, lease = await _admitted(service, caller, body.model, prompts, params)
    request_id = new_request_id("cmpl")
    created = int(time.time())
    base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
    headers = _headers(request_id, target)

    if body.stream:
        deltas = service.generate(prompts[0], params[0], request_id, target, lease)
        offsets = [ChoiceLogprobs() for _ in range(body.n)]
        echoed: set[int] = set()
        prompt_logprobs: tuple[TokenLogprob, ...] = ()

        def chunk(delta: Delta) -> dict[str, Any]:
            nonlocal prompt_logprobs
            prompt_logprobs = delta.prompt_logprobs or prompt_logprobs
            text, tokens = delta.text, list(delta.logprobs or ())
            if body.echo and delta.index not in echoed:
                echoed.add(delta.index)
                text, tokens = parsed[0][1] + text, [*prompt_logprobs, *tokens]
            choice = {
                "index": delta.index,
                "text": text,
                "logprobs": None if body.logprobs is None else offsets[delta.index].shape(tokens),
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
        _completion_choice(i * body.n + j, c, parsed[i][1], body)
        for i, result in enumerate(results)
        for j, c in enumerate(result)
    ]
    completion_tokens = sum(c.tokens for result in results for c in result)
    prompt_tokens = sum(len(ids) for ids in prompts) * body.n
    cached = sum(max(c.cached_tokens for c in result) for result in results)
    usage = _usage(prompt_tokens, completion_tokens, cached)
    payload = {**base, "choices": choices, "usage": usage}
    return _json(payload, headers)


def _completion_choice(
    index: int, choice: _Choice, prompt_text: str, body: CompletionRequest
) -> dict[str, Any]:
    """One non-streamed completions choice; echo puts the prompt (and its logprobs) first."""
    text, tokens = "".join(choice.text), list(choice.logprobs)
    if body.scoring_only:
        text, tokens = "", []
    if body.echo:
        text, tokens = prompt_text + text, [*choice.prompt_logprobs, *tokens]
    return {
        "index": index,
        "text": text,
        "logprobs": None if body.logprobs is None else ChoiceLogprobs().shape(tokens),
        "finish_reason": "length" if body.scoring_only else choice.finish_reason,
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: CallerDep) -> Any:
    """OpenAI chat completions, rendered with the base model's chat template."""
    service = _service(request)
    try:
        messages = [{"role": m.template_role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise InvalidRequest(f"messages: {exc}", param="messages") from exc
    top = body.top_logprobs or 0
    _check_logprobs(service, top, "top_logprobs")
    prompt_ids = service.prompts.chat(messages)
    params = _params(
        body,
        service.prompts.budget(prompt_ids, body.token_budget()),
        caller,
        logprobs=top if body.logprobs else None,
        json_format=body.json_format(),
    )
    target, lease = await _admitted(service, caller, body.model, [prompt_ids], [params])
    request_id = new_request_id("chatcmpl")
    created = int(time.time())
    base = {"id": request_id, "created": created, "model": body.model}
    headers = _headers(request_id, target)
    deltas = service.generate(prompt_ids, params, request_id, target, lease)

    def logprobs(tokens: tuple[TokenLogprob, ...] | list[TokenLogprob] | None) -> Any:
        return chat_logprobs(tokens or (), top) if body.logprobs else None

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
                "logprobs": logprobs(delta.logprobs),
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
            "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
            "logprobs": logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
        }
        for j, c in enumerate(result)
    ]
    cached = max(c.cached_tokens for c in result)
    usage = _usage(len(prompt_ids) * body.n, sum(c.tokens for c in result), cached)
    payload = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
    return _json(payload, headers)


def _card(service: Service, card: ModelCard | None) -> dict[str, Any]:
    """OpenAI's model object; ``None``: the base model (owned by loraplex, created at start)."""
    if card is None:
        return {
            "id": service.base_name,
            "object": "model",
            "created": service.started,
            "owned_by": "loraplex",
            "parent": None,
        }
    return {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owner or "loraplex",
        "parent": service.base_name,
    }


@router.get("/v1/models")
async def models(request: Request, caller: CallerDep) -> dict[str, Any]:
    """The base model and the adapters this caller may use."""
    service = _service(request)
    cards = await asyncio.to_thread(service.source.models, caller.may_use)
    return {"object": "list", "data": [_card(service, c) for c in [None, *cards]]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """One model the caller may use (``N``, ``N@vK``, ``N:alias``); 404 exactly like an
    unknown one for another tenant's adapter."""
    service = _service(request)
    adapter = await service.resolve(model, caller)
    if adapter is None:
        return _card(service, None)
    cards = await asyncio.to_thread(service.source.models, caller.may_use)
    named = next((c for c in cards if c.id == adapter.name), None)
    created = named.created if named else service.started
    return _card(service, ModelCard(model, adapter.tenant, created))


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, caller: CallerDep) -> Any:
    """``{prompt, lora_name, max_tokens, temperature} -> {text}`` for the original clients."""
    service = _service(request)
    adapter = await service.resolve(body.lora_name or service.base_name, caller)
    # Each adapter is prompted the way it was trained (its manifest's prompt format).
    if adapter is not None and adapter.prompt_format == "chat":
        prompt_ids = service.prompts.chat([{"role": "user", "content": body.prompt}])
    else:
        prompt_ids = service.prompts.completion(body.prompt)
    params = GenerationParams(
        max_tokens=service.prompts.budget(prompt_ids, body.max_tokens),
        temperature=body.temperature,
        cache_salt=caller.cache_salt,
    )
    check_caps(service.settings, [len(prompt_ids)], params.max_tokens, 1)
    target, lease = await _admitted_resolved(service, caller, adapter, [prompt_ids], [params])
    request_id = new_request_id("gen")
    try:
        deltas = service.generate(prompt_ids, params, request_id, target, lease)
        (choice,) = await unless_disconnected(request, _collect(deltas, 1))
    finally:
        lease.release()
    return _json({"text": "".join(choice.text)}, _headers(request_id, target))


def _json(payload: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(payload, headers=headers)
