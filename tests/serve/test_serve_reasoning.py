"""Efficient reasoning over HTTP: the think_budget / early_exit extension fields on the real server."""

from __future__ import annotations

import httpx
import pytest

from llmopt.reasoning.format import format_ok
from serve_util import MODEL


@pytest.mark.parametrize("body, param", [({"think_budget": 0}, "think_budget"),
                                         ({"think_budget": -4}, "think_budget"),
                                         ({"answer_budget": 0}, "answer_budget"),
                                         ({"early_exit": True, "early_exit_threshold": 0}, "early_exit_threshold"),
                                         ({"early_exit_threshold": 1.5}, "early_exit_threshold"),
                                         ({"loop_exit": True, "loop_exit_ngram": 1}, "loop_exit_ngram"),
                                         ({"loop_exit": True, "loop_exit_repeats": 0}, "loop_exit_repeats"),
                                         ({"think_budget_threshold": 0.9}, "think_budget_threshold"),
                                         ({"low_confidence_exit": 1.0}, "low_confidence_exit"),
                                         ({"low_confidence_exit": 0}, "low_confidence_exit"),
                                         ({"think_gate": 0}, "think_gate"),
                                         ({"think_gate": 8, "think_gate_threshold": 1.5}, "think_gate_threshold"),
                                         ({"difficulty_exit": 1.0}, "difficulty_exit"),
                                         ({"difficulty_exit": 0.9, "difficulty_exit_tokens": 0},
                                          "difficulty_exit_tokens"),
                                         ({"think_budget": 8, "think_budget_threshold": 0}, "think_budget_threshold"),
                                         ({"think_budget": 8, "think_budget_threshold": 0.9, "think_budget_max": 4},
                                          "think_budget_max")])
def test_bad_reasoning_fields_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **body},
                   headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_think_budget_closes_thinking_over_http(client):
    # the prompt opens <think>: the budget counts from the first output token
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7? Think first.\n<think>\n",
                                  max_tokens=48, temperature=0.0, stop=["</answer>"],
                                  extra_body={"think_budget": 6, "include_stop_str_in_output": True})
    text = r.choices[0].text
    assert "</think>\n<answer>\n" in text and format_ok("<think>\n" + text), text


def test_low_confidence_exit_closes_thinking_over_http(client):
    # the tiny random model's tokens are all guesses: at 0.99 thinking closes in place of the first one
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7? Think first.\n<think>\n",
                                  max_tokens=40, temperature=0.0, stop=["</answer>"],
                                  extra_body={"low_confidence_exit": 0.99, "answer_budget": 10,
                                              "include_stop_str_in_output": True})
    text = r.choices[0].text
    assert text.startswith("</think>\n<answer>\n") and format_ok("<think>\n" + text), text


def test_think_gate_closes_thinking_over_http(client):
    # the tiny random model is unsure of every token: a one-token gate at 0.99 closes in place of the first one
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7? Think first.\n<think>\n",
                                  max_tokens=40, temperature=0.0, stop=["</answer>"],
                                  extra_body={"think_gate": 1, "think_gate_threshold": 0.99, "answer_budget": 10,
                                              "include_stop_str_in_output": True})
    text = r.choices[0].text
    assert text.startswith("</think>\n<answer>\n") and format_ok("<think>\n" + text), text


def test_answer_budget_closes_the_answer_over_http(client):
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7? Think first.\n<think>\n",
                                  max_tokens=120, temperature=0.0, stop=["</answer>"],
                                  extra_body={"think_budget": 6, "answer_budget": 40, "ignore_eos": True,
                                              "include_stop_str_in_output": True})
    c = r.choices[0]
    assert c.text.endswith("</answer>") and format_ok("<think>\n" + c.text), c.text
    assert r.usage.completion_tokens == 6 + 40


def test_gated_budget_fields_reach_the_engine_over_http(client):
    # a threshold of 1.0 is never passed: the trial answer at 6 is dropped and thinking is cut at the cap
    r = client.completions.create(model=MODEL, prompt="Q: What is 6 times 7? Think first.\n<think>\n",
                                  max_tokens=48, temperature=0.0, stop=["</answer>"],
                                  extra_body={"think_budget": 6, "think_budget_threshold": 1.0, "think_budget_max": 12,
                                              "ignore_eos": True,
                                              "include_stop_str_in_output": True, "jump_forward": True})
    text = r.choices[0].text
    assert format_ok("<think>\n" + text), text
    assert r.usage.completion_tokens >= 12 + 8  # thinking ran to the cap, then the closing text


def test_difficulty_exit_without_a_probe_is_a_400_that_says_what_to_do(server):
    """The test server's tiny model ships no difficulty probe: the request is refused, the server goes on."""
    body = {"model": MODEL, "prompt": "hi<think>", "max_tokens": 4, "difficulty_exit": 0.9}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert "llmopt train probe" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                    headers=server.headers, timeout=60)
    assert ok.status_code == 200
