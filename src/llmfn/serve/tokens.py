"""POST /tokenize and POST /detokenize (vLLM's shapes): a prompt or chat messages as token ids, and
token ids as text."""

from __future__ import annotations

from llmfn.chat_template import apply_chat_template
from llmfn.serve import schemas as s
from llmfn.serve.http import ApiError, Request, Response
from llmfn.serve.models import ModelPool
from llmfn.serve.requests import message_dict, request_error


async def tokenize(pool: ModelPool, req: Request):
    body = req.decode(s.TokenizeRequest)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    served = pool.get(body.model)
    model = served.model
    if body.messages is not None:
        if not model.chat_template:
            raise ApiError(400, f"the model {served.name!r} has no chat template", param="messages")
        messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
        ids = request_error(lambda: apply_chat_template(model.tokenizer, model.chat_template, messages,
                                                        add_generation_prompt=body.add_generation_prompt))  # fmt: skip
    else:
        ids = model.tokenizer.encode_prompt(body.prompt)
    return Response.json(s.TokenizeResponse(len(ids), served.context_length, ids))


async def detokenize(pool: ModelPool, req: Request):
    body = req.decode(s.DetokenizeRequest)
    served = pool.get(body.model)
    vocab = len(served.model.tokenizer)
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is out of range [0, {vocab})", param="tokens")
    return Response.json(s.DetokenizeResponse(served.model.tokenizer.decode(body.tokens)))
