"""Guided decoding over HTTP: OpenAI ``response_format`` and vLLM's ``guided_*`` fields on the real
server (loopback, embedded model); bad grammars are 400s that name the field."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from serve_util import MODEL

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a pirate as JSON with name and age."}]


def _valid(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 16 and type(obj["age"]) is int and 0 <= obj["age"] <= 120)


def test_response_format_json_schema_gives_valid_json_for_every_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=48, n=2, seed=7, temperature=0.8,
        response_format={"type": "json_schema", "json_schema": {"name": "pirate", "schema": SCHEMA}})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        assert _valid(json.loads(c.message.content)), c.message.content


def test_response_format_json_object_gives_a_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=64, temperature=0.0,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":  # "length" is allowed: a free-form object may be long
        assert isinstance(json.loads(c.message.content), dict)
    assert c.message.content.startswith("{")


def test_guided_regex_on_completions_fullmatches(client):
    regex = r"The answer is [0-9]{1,4}\."
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7?\nA:", max_tokens=24, n=2, seed=1,
                                  temperature=1.0, extra_body={"guided_regex": regex})
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert re.fullmatch(regex, c.text), c.text


def test_guided_choice_streamed_with_logprobs(client):
    choices = ["positive", "negative"]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is 'I love it' positive or negative?"}],
        max_tokens=8, temperature=0.0, stream=True, logprobs=True, top_logprobs=3,
        extra_body={"guided_choice": choices})
    text, first_top, finish = "", None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        text += ch.delta.content or ""
        if ch.logprobs and ch.logprobs.content and first_top is None:
            first_top = ch.logprobs.content[0].top_logprobs
        finish = ch.finish_reason or finish
    assert text in choices and finish == "stop"
    # the masked distribution: only the first tokens of the two choices can be among the top
    assert first_top and all("positive".startswith(t.token) or "negative".startswith(t.token) for t in first_top)


def test_guided_regex_with_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="List:", max_tokens=24, temperature=0.0, stop=[";"],
                                  extra_body={"guided_regex": r"[a-z]{1,5}(;[a-z]{1,5}){1,3}"})
    c = r.choices[0]
    assert c.finish_reason == "stop" and re.fullmatch(r"[a-z]{1,5}", c.text), c.text


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/completions", {"prompt": "x", "guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "objectx"}}, "guided_json", "objectx"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "only one of"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": "zero"}}}}, "response_format", "guided_json"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "json_schema"}}, "response_format",
     "json_schema.schema"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "json_object"},
                              "guided_regex": "a"}, "response_format", "give one of them"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "yaml"}}, "response_format", "yaml"),
])
def test_bad_grammar_is_a_400_naming_the_field(server, path, body, param, needle):
    r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 4, **body}, headers=server.headers,
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert param in (err.get("param") or "") or param in err["message"]
