"""JSON output and tool calls through the OpenAI client: constrained decoding makes SmolLM2 reliable."""

import json

import jsonschema
import openai
import pytest

MODEL = "smollm2:135m"

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_json_schema_output_parses_and_validates(live):
    r = live.client().chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Give me a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, PERSON)
    assert r.choices[0].finish_reason == "stop"


def test_json_object_output_is_an_object(live):
    r = live.client().chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Repeat this JSON exactly: {"animal": "cat", "legs": 4}'}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_unsupported_schema_keyword_is_a_400_naming_response_format(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "pattern": "^a+$"}}})
    assert info.value.body["param"] == "response_format" and "pattern" in info.value.body["message"]


def test_tool_call_required_round_trip(live):
    client = live.client()
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)  # a JSON *string*, as OpenAI sends it
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # Send the result back: the dialog with an assistant tool call and a tool message renders and answers.
    follow = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=12, tools=[WEATHER], tool_choice="none",
        messages=ASK + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'}])
    assert follow.choices[0].finish_reason in ("stop", "length") and follow.choices[0].message.content


def test_tool_call_named_function_streams_as_tool_call_deltas(live):
    chunks = list(live.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == "" and finishes == ["tool_calls"]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert "city" in json.loads(calls[0].function.arguments)


def test_tool_choice_naming_an_unknown_function_is_a_400(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=5,
                                              tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"
