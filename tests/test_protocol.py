from __future__ import annotations

import logging

import pydantic
import pytest
from pydantic import ValidationError

from vlmlab.protocol import errors
from vlmlab.protocol.core import (
    Chat,
    GenerationResult,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    Timings,
)
from vlmlab.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
)

IMG = "data:image/png;base64,iVBORw0KGgo="


def test_request_with_interleaved_images_maps_to_core_chat_in_order() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "nano",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image_url", "image_url": {"url": IMG}},
                        {"type": "text", "text": "with"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
                    ],
                },
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stop": "\n",
            "temperature": 0,
            "seed": 3,
        }
    )
    chat = req.to_chat()
    assert [m.role for m in chat.messages] == ["system", "user"]
    kinds = [type(p).__name__ for p in chat.messages[1].content]
    assert kinds == ["TextPart", "ImagePart", "TextPart", "ImagePart"]
    assert [i.ref for i in chat.images] == [IMG, "https://example.com/b.jpg"]
    sampling = req.to_sampling()
    assert sampling.max_tokens == 7  # max_completion_tokens wins over max_tokens
    assert sampling.stop == ("\n",) and sampling.greedy and sampling.deterministic


def test_unknown_fields_are_accepted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlmlab.protocol.openai"):
        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5, "foo": 1, "store": True}
        )
    assert req.model_extra == {"foo": 1, "store": True}  # frequency_penalty is a field now
    assert req.to_sampling().frequency_penalty == 0.5
    assert "ignoring unknown fields ['foo', 'store']" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ],
)
def test_malformed_requests_fail_validation(body: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_n_over_sixteen_and_images_outside_user_turns_are_bad_requests() -> None:
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 16"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "n": 17})
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "n": 16}).n == 16
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}]}
    )
    with pytest.raises(errors.BadRequestError, match=r"messages\[0\]: images are only accepted in user"):
        req.to_chat()


def test_sampling_params_validate_ranges() -> None:
    with pytest.raises(errors.BadRequestError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(errors.BadRequestError, match="max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0)
    assert not SamplingParams(temperature=0.7).deterministic
    assert SamplingParams(temperature=0.7, seed=1).deterministic


def test_response_usage_includes_image_tokens_and_timings() -> None:
    result = GenerationResult(
        text="red",
        finish_reason="stop",
        prompt_tokens=120,
        image_tokens=100,
        completion_tokens=3,
        timings=Timings(ttft_s=0.05, decode_s=0.02, total_s=0.07, stages={"decode": 0.001}),
    )
    resp = ChatCompletionResponse.from_result(result, model="nano").model_dump()
    assert resp["object"] == "chat.completion" and resp["id"].startswith("chatcmpl-")
    assert resp["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 3,
        "total_tokens": 123,
        "prompt_tokens_details": {"image_tokens": 100, "cached_tokens": 0},
    }
    assert resp["choices"][0]["message"] == {"role": "assistant", "content": "red"}
    assert resp["timings"]["ttft_ms"] == 50.0
    assert resp["timings"]["decode_tokens_per_s"] == pytest.approx(100.0)
    chunk = ChatCompletionChunk(id="c", model="nano", choices=[ChunkChoice(delta=DeltaMessage(content="r"))])
    assert chunk.model_dump()["object"] == "chat.completion.chunk"
    models = ModelList(data=[ModelCard(id="nano", max_model_len=1024, max_images=4, engine="hf")])
    assert models.model_dump()["data"][0]["input_modalities"] == ["text", "image"]


def test_every_error_class_maps_to_an_openai_error_object() -> None:
    cases = {
        errors.BadRequestError("x"): (400, "BadRequestError"),
        errors.ForbiddenMediaError("x"): (403, "PermissionDeniedError"),
        errors.AuthenticationError("x"): (401, "AuthenticationError"),
        errors.NotFoundError("x"): (404, "NotFoundError"),
        errors.OverloadedError("x", retry_after=2): (429, "RateLimitError"),
        errors.RequestTimeoutError("x"): (504, "GatewayTimeoutError"),
        errors.EngineUnavailableError("x"): (503, "ServiceUnavailableError"),
        errors.EngineError("x"): (500, "InternalServerError"),
    }
    for exc, (status, kind) in cases.items():
        body = exc.to_openai()
        ErrorResponse.model_validate(body)
        assert exc.status_code == status and body["error"]["type"] == kind
        assert body["error"]["code"] == (exc.default_code or status)
    media = {
        errors.ImageTooLargeError("x"): "image_too_large",
        errors.ImageDecodeError("x"): "image_decode_failed",
        errors.MediaFetchError("x"): "image_fetch_failed",
        errors.MediaTimeoutError("x"): "image_fetch_timeout",
    }
    for exc, code in media.items():  # the user's input: 400 with a string code, never a 5xx
        assert exc.to_openai()["error"] | {"message": None} == {
            "message": None, "type": "BadRequestError", "param": None, "code": code
        }
    assert errors.ForbiddenMediaError("x").to_openai()["error"]["code"] == "image_url_forbidden"
    ctx = errors.ContextLengthError("too long").to_openai()["error"]
    assert ctx == {
        "message": "too long",
        "type": "BadRequestError",
        "param": "messages",
        "code": "context_length_exceeded",
    }


def test_core_chat_helpers() -> None:
    chat = Chat.single("What colour?", [ImagePart(ref="a.png")])
    assert chat.messages[0].text == "What colour?"
    assert isinstance(chat.messages[0].content[0], ImagePart)
    assert Message.of("user", "a", TextPart("b")).text == "ab"
    with pytest.raises(errors.BadRequestError):
        Chat(())
    with pytest.raises(errors.BadRequestError):
        ImagePart()
