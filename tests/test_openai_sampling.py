"""The chat API's answer-shaping fields on a real server (nano, official openai client): logprobs,
penalties, logit_bias, min_tokens, n honoured as specified; every field vlmlab does not honour is a
400 that names it, never a silent 200."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings

RED = image_message("What colour is the shape?", data_url(png_bytes(96, 64, "red", "square")))


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), default_max_tokens=16, response_cache_entries=0)
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, messages=RED, **kwargs):
    return client.chat.completions.create(model="nano", messages=messages, temperature=0, **kwargs)


def test_logprobs_describe_the_greedy_answer(client: openai.OpenAI) -> None:
    reply = greedy(client, logprobs=True, top_logprobs=5, max_tokens=8)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content == "red"
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        # greedy: the chosen token is its step's most likely one
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0 + 1e-6
        assert bytes(token.bytes).decode() == token.token
        assert token.logprob <= 0.0


def test_streamed_logprobs_equal_the_whole_answers(client: openai.OpenAI) -> None:
    whole = greedy(client, logprobs=True, top_logprobs=2, max_tokens=6, extra_body={"ignore_eos": True})
    streamed = []
    text = ""
    for chunk in greedy(client, logprobs=True, top_logprobs=2, max_tokens=6, stream=True, extra_body={"ignore_eos": True}):
        choice = chunk.choices[0] if chunk.choices else None
        if choice and choice.logprobs and choice.logprobs.content:
            streamed += choice.logprobs.content
        if choice and choice.delta.content:
            text += choice.delta.content
    expected = whole.choices[0].logprobs.content
    assert text == whole.choices[0].message.content
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in expected]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [[a.token for a in t.top_logprobs] for t in expected]


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    assert greedy(client, max_tokens=4).choices[0].logprobs is None


def test_logit_bias_moves_the_answer(client: openai.OpenAI) -> None:
    first = greedy(client, max_tokens=4)
    # -100 on every id of nano's 448 but one: that one is the only likely token at every step
    only = 300
    bias = {str(i): -100 for i in range(448) if i != only}
    second = greedy(client, logprobs=True, max_tokens=4, logit_bias=bias, extra_body={"ignore_eos": True})
    content = second.choices[0].logprobs.content
    assert len(content) == 4 and all(t.logprob == pytest.approx(0.0, abs=1e-3) for t in content)
    assert len({t.token for t in content}) == 1
    assert second.choices[0].message.content != first.choices[0].message.content


def test_logit_bias_on_an_unknown_token_id_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, logit_bias={"99999": 5})
    assert info.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, logit_bias={"red": 5})
    assert info.value.body["param"] == "logit_bias"


def test_frequency_and_presence_penalties_lower_repeated_tokens(client: openai.OpenAI) -> None:
    """Same prompt, same greedy steps: a penalty subtracts count * frequency (+ presence) from the
    logit of every token already generated, which the logprob of a repeated token shows."""
    plain = greedy(client, max_tokens=12, logprobs=True, extra_body={"ignore_eos": True})
    tokens = [t.token for t in plain.choices[0].logprobs.content]
    assert len(set(tokens)) < len(tokens), tokens  # nano repeats itself without a penalty
    penalised = greedy(client, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0, extra_body={"ignore_eos": True})
    text = penalised.choices[0].message.content
    assert text != plain.choices[0].message.content
    # its tokens repeat less
    again = greedy(client, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0, logprobs=True, extra_body={"ignore_eos": True})
    penalised_tokens = [t.token for t in again.choices[0].logprobs.content]
    assert len(set(penalised_tokens)) > len(set(tokens))


def test_repetition_penalty_changes_a_repeating_answer(client: openai.OpenAI) -> None:
    plain = greedy(client, max_tokens=12, extra_body={"ignore_eos": True})
    penalised = greedy(client, max_tokens=12, extra_body={"ignore_eos": True, "repetition_penalty": 5.0})
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def test_min_tokens_holds_back_the_end(client: openai.OpenAI) -> None:
    short = greedy(client, max_tokens=16)
    assert short.usage.completion_tokens < 6 and short.choices[0].finish_reason == "stop"
    longer = greedy(client, max_tokens=16, extra_body={"min_tokens": 6})
    assert longer.usage.completion_tokens >= 6
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, max_tokens=4, extra_body={"min_tokens": 9})
    assert info.value.body["param"] == "min_tokens"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"n": 17}, "n"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"best_of": 3}, "best_of"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"stop_token_ids": [2]}, "stop_token_ids"),
        ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ({"echo": True}, "echo"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "[0-9]+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
def test_fields_that_are_not_honoured_are_refused_by_name(server, fields: dict, param: str) -> None:
    body = {"model": "nano", "messages": RED, "max_tokens": 4, **fields}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "BadRequestError"  # vLLM's error type for a 400


def test_harmless_fields_are_accepted(server) -> None:
    body = {"model": "nano", "messages": RED, "max_tokens": 4, "temperature": 0, "store": False, "metadata": {"k": "v"},
            "tool_choice": "none", "modalities": ["text"], "response_format": {"type": "text"}, "user": "u"}  # fmt: skip
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "red"


def test_models_lists_the_features_honoured(client: openai.OpenAI) -> None:
    card = client.models.list().data[0]
    assert set(card.model_extra["supported_features"]) == {"structured_outputs", "logprobs", "penalties", "logit_bias", "min_tokens", "tools"}


def test_n_choices_share_the_image_work(client: openai.OpenAI) -> None:
    """n answers: each its own sample (choice i seeded seed + i), the prompt counted once; the
    later choices find the first one's image work in the caches."""
    kwargs = {"model": "nano", "messages": RED, "temperature": 1.0, "seed": 3, "max_tokens": 6, "n": 4, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # independent samples
    assert whole.usage.completion_tokens == 4 * 6 and whole.usage.prompt_tokens_details.image_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    streamed: dict[int, str] = {}
    hits: dict[int, int] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                hits[choice.index] = chunk.model_extra["timings"]["preprocess_cache_hits"]
    assert [streamed[i] for i in range(4)] == texts  # the same seeds, streamed or not
    assert all(hits[i] >= 1 for i in (1, 2, 3)), hits  # the image was preprocessed once


def test_greedy_choices_agree(client: openai.OpenAI) -> None:
    reply = greedy(client, max_tokens=6, n=3)
    assert [c.message.content for c in reply.choices] == ["red"] * 3


def test_the_remote_engine_forwards_every_field(server) -> None:
    """A vlmlab server in front of another (engine remote): the fields travel upstream and the
    logprobs come back."""
    settings = ServerSettings(engines=(EngineSpec(model="nano", engine="remote", extra={"base_url": server.base_url}),), response_cache_entries=0)
    with running_server(settings) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}}, "required": ["colour"], "additionalProperties": False}
        reply = client.chat.completions.create(
            model="nano", messages=RED, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        )  # fmt: skip
        assert reply.choices[0].message.content == '{"colour":"red"}'
        content = reply.choices[0].logprobs.content
        assert "".join(t.token for t in content) == reply.choices[0].message.content
        biased = client.chat.completions.create(
            model="nano", messages=RED, temperature=0, max_tokens=4, logprobs=True,
            logit_bias={str(i): -100 for i in range(448) if i != 300}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert len({t.token for t in biased.choices[0].logprobs.content}) == 1 and biased.usage.completion_tokens == 4
        choice = client.chat.completions.create(model="nano", messages=RED, temperature=1.0, seed=2, max_tokens=8, extra_body={"guided_choice": ["left", "right"]})
        assert choice.choices[0].message.content in ("left", "right")
