"""What current clients send, through the official `openai` client against a live `corral serve` app
(issue 14 items 17, 18, 21): the developer role, prompt batches, the Responses API, image parts,
x-request-id, and /metrics after a delete."""

import json

import openai
import pytest

MODEL = "smollm2:135m"
QUESTION = [{"role": "user", "content": "Name a colour."}]


def test_developer_role_is_a_system_message(live):
    client = live.client()
    as_dev = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=[{"role": "developer", "content": "Answer in French."}, *QUESTION])
    as_sys = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=[{"role": "system", "content": "Answer in French."}, *QUESTION])
    assert as_dev.choices[0].message.content == as_sys.choices[0].message.content
    assert as_dev.usage.prompt_tokens == as_sys.usage.prompt_tokens


def test_completions_batch_of_prompts_answers_each_in_order(live):
    """LangChain's OpenAI.batch sends prompt=[...]; choice i*n + j is sample j of prompt i."""
    client = live.client()
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert sorted(streamed) == list(range(6))
    assert [streamed[2 * i] for i in range(3)] == [s.choices[0].text for s in singles]
    assert live.wait_idle(10) == 0


def test_responses_api_text_and_stream(live):
    client = live.client()
    poem = [{"role": "user", "content": "Write a poem about the sea."}]
    chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                          messages=[{"role": "system", "content": "Be brief."}, *poem])
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=poem[0]["content"], max_output_tokens=12,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 12
    events = list(client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=12,
                                          temperature=0, stream=True,
                                          input=[{"role": "user", "content": [{"type": "input_text",
                                                                               "text": poem[0]["content"]}]}]))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_responses_refuse_what_they_cannot_do(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert "previous_response_id" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    assert err.value.body["param"] == "max_output_tokens"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses"])
def test_an_image_part_is_refused_by_name(live, route):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}
            if route.endswith("completions") else
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                    {"type": "input_image", "image_url": "data:,"}]}]})
    with live.http() as h:
        r = h.post(route, json={"model": MODEL, **body})
    assert r.status_code == 400 and "images are not supported" in r.json()["error"]["message"]


def test_every_answer_carries_a_request_id(live):
    client = live.client()
    answer = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert answer.headers["x-request-id"].startswith("req_")
    with live.http() as h:
        assert h.get("/nowhere").headers["x-request-id"].startswith("req_")  # errors too
        assert h.get("/health", headers={"x-request-id": "abc-1"}).headers["x-request-id"] == "abc-1"
        two = {h.get("/health").headers["x-request-id"] for _ in range(2)}
    assert len(two) == 2


def test_metrics_drop_a_deleted_models_series(live):
    with live.http() as h:
        assert h.post("/api/copy", json={"source": MODEL, "destination": "doomed:1"}).status_code == 200
        r = h.post("/api/generate", json={"model": "doomed:1", "prompt": "Hi", "stream": False,
                                          "options": {"num_predict": 2}})
        assert r.status_code == 200
        assert 'model="doomed:1"' in h.get("/metrics").text
        assert h.request("DELETE", "/api/delete", content=json.dumps({"model": "doomed:1"})).status_code == 200
        assert live.wait_idle(10) == 0
        assert 'model="doomed:1"' not in h.get("/metrics").text


def test_pydantic_field_bounds_hold_in_structured_output(live):
    """Issue 14 items 19 and 20: Field(ge=, le=, gt=, lt=) become minimum/maximum/exclusive*, enforced while
    decoding (a 400 before); the JSON carries no whitespace runs."""
    from pydantic import BaseModel, Field

    class Review(BaseModel):
        stars: int = Field(ge=1, le=5)
        score: float = Field(gt=0, lt=1)
        year: int = Field(ge=1900, le=2030)

    answer = live.client().chat.completions.parse(
        model=MODEL, response_format=Review, max_tokens=60, temperature=1.0, seed=3,
        messages=[{"role": "user", "content": "Review a film as JSON: stars, score, year."}])
    review = answer.choices[0].message.parsed
    assert review is not None and 1 <= review.stars <= 5 and 0 < review.score < 1 and 1900 <= review.year <= 2030
    text = answer.choices[0].message.content
    assert not any(run in text for run in ("  ", "\n\n", "\t", "\r", " \n", "\n "))
