"""Structured output and tool calling through the real server, with the clients applications use:
openai (parse, json_object / json_schema, tools under every tool_choice, streamed calls, a tool round
trip, n, logit_bias, vLLM's guided_* fields, the Responses API), langchain-openai, instructor and
pydantic-ai. The model is the real SmolLM2-135M-Instruct, greedy (temperature 0) so that a run is
reproducible; the grammar guarantees the shapes, the assertions check them."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from server_util import start_server, write_config

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
           "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                           "parameters": WEATHER}}]  # fmt: skip
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    size: Literal["small", "medium", "large"]
    landmarks: list[str] = Field(min_length=1, max_length=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured-server")
    config = write_config(folder, [{"name": MODEL, "path": "smollm2-135m-instruct"}])
    with start_server(config, ready_timeout=300, log_dir=folder) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, **{"messages": ASK, "max_tokens": 80, "temperature": 0, **kw})


# ---------------------------------------------------------------------------------------------- structured output


def test_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}], response_format=City,
        max_tokens=120, temperature=0,
    )  # fmt: skip
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and reply.choices[0].finish_reason == "stop"
    assert City.model_validate_json(reply.choices[0].message.content) == city


def test_json_object_and_json_schema(client):
    reply = chat(client, messages=[{"role": "user", "content": "Bob is 30. Reply with a JSON object with his name."}],
                 response_format={"type": "json_object"}, max_tokens=60)  # fmt: skip
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # max_tokens reached inside the object: the partial text, as OpenAI answers
        assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")
    schema = Person.model_json_schema()
    reply = chat(client, messages=[{"role": "user", "content": "Bob is 30 years old. Extract the person."}],
                 response_format={"type": "json_schema", "json_schema": {"name": "Person", "schema": schema, "strict": True}})  # fmt: skip
    assert Person.model_validate_json(reply.choices[0].message.content).age <= 120


def test_vllm_guided_fields(client):
    assert chat(client, extra_body={"guided_choice": ["yes", "no"]}).choices[0].message.content in ("yes", "no")
    text = chat(client, extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"}).choices[0].message.content
    assert len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit()
    reply = chat(client, extra_body={"guided_json": Person.model_json_schema()})
    Person.model_validate_json(reply.choices[0].message.content)
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    assert chat(client, extra_body={"guided_grammar": lark}).choices[0].message.content in (
        "The answer is yes.", "The answer is no.")


def test_a_constraint_error_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "format": "no-such"}}}}})
    assert err.value.body["param"] == "response_format"


# ---------------------------------------------------------------------------------------------- tools


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_are_valid_calls(client, choice):
    reply = chat(client, tools=TOOLS, tool_choice=choice)
    message, finish = reply.choices[0].message, reply.choices[0].finish_reason
    assert finish == "tool_calls" and message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}


def test_auto_and_none(client):
    reply = chat(client, tools=TOOLS, tool_choice="auto")
    choice = reply.choices[0]
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    assert choice.message.tool_calls or choice.message.content
    reply = chat(client, tools=TOOLS, tool_choice="none")
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_reassemble_in_the_sdk(client):
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=80, temperature=0,
                                        tools=[openai.pydantic_function_tool(Person, name="record_person")],
                                        tool_choice="required") as stream:  # fmt: skip
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and calls
    assert all(isinstance(c.function.parsed_arguments, Person) for c in calls)
    plain = chat(client, tools=[openai.pydantic_function_tool(Person, name="record_person")], tool_choice="required")
    assert [c.function.arguments for c in plain.choices[0].message.tool_calls] == [c.function.arguments for c in calls]


def test_a_tool_round_trip(client):
    call = chat(client, tools=TOOLS, tool_choice="required").choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
    ]  # fmt: skip
    reply = chat(client, messages=history, tools=TOOLS)
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 60


# ---------------------------------------------------------------------------------------------- the rest


def test_n_choices_are_the_seeds_in_turn(client):
    kw = dict(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=1.0)
    three = chat(client, n=3, seed=11, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [chat(client, n=1, seed=11 + i, **kw) for i in range(3)]
    assert [c.message.content for c in three.choices] == [s.choices[0].message.content for s in singles]
    assert three.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert three.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_logit_bias_bans_and_forces(client, server):
    import llmfn

    tok = llmfn.load_tokenizer(llmfn.loading.resolve("smollm2-135m-instruct"))
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    plain = chat(client, messages=ask, max_tokens=12).choices[0].message.content
    first = tok.encode(plain)[0]
    banned = chat(client, messages=ask, max_tokens=12, logit_bias={str(first): -100}).choices[0].message.content
    assert tok.encode(banned)[0] != first
    yes = tok.encode(" yes")[0]
    forced = chat(client, messages=ask, max_tokens=3, logit_bias={str(yes): 100}).choices[0].message.content
    assert forced == tok.decode([yes] * 3)


def test_unset_sampling_takes_the_models_defaults(client):
    """SmolLM2's alias records its card's temperature 0.2 / top_p 0.9: with a seed, leaving them unset
    equals sending them, and differs from greedy."""
    kw = dict(messages=[{"role": "user", "content": "Write a line about the sea."}], max_tokens=24, seed=3)
    unset = client.chat.completions.create(model=MODEL, **kw).choices[0].message.content
    given = client.chat.completions.create(model=MODEL, temperature=0.2, top_p=0.9, **kw).choices[0].message.content
    assert unset == given


def test_responses_api(client):
    reply = client.responses.create(model=MODEL, input="What is the capital of France?", instructions="Be brief.",
                                    max_output_tokens=20, temperature=0)  # fmt: skip
    assert reply.status in ("completed", "incomplete") and reply.output_text and reply.usage.output_tokens > 0
    with client.responses.stream(model=MODEL, input="Name a fruit.", max_output_tokens=12, temperature=0) as stream:
        deltas = [ev.delta for ev in stream if ev.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    fn = {"type": "function", "name": "get_weather", "description": "Get the weather", "parameters": WEATHER}
    calls = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=[fn],
                                    tool_choice="required", max_output_tokens=60, temperature=0)  # fmt: skip
    made = [o for o in calls.output if o.type == "function_call"]
    assert made and all(o.name == "get_weather" and "city" in json.loads(o.arguments) for o in made)
    follow = client.responses.create(model=MODEL, tools=[fn], max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": made[0].call_id, "name": "get_weather", "arguments": made[0].arguments},
        {"type": "function_call_output", "call_id": made[0].call_id, "output": "sunny, 24 C"},
    ])  # fmt: skip
    assert follow.output_text
    typed = client.responses.parse(model=MODEL, input="Bob is 30 years old.", text_format=Person,
                                   max_output_tokens=60, temperature=0)  # fmt: skip
    assert isinstance(typed.output_parsed, Person)


# ---------------------------------------------------------------------------------------------- other clients


def test_langchain_structured_output_and_tools(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url("/v1"), api_key="unused", model=MODEL, temperature=0, max_tokens=80)
    person = llm.with_structured_output(Person).invoke("Bob is 30 years old. Extract the person.")
    assert isinstance(person, Person)

    @tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="any").invoke("What's the weather in Paris?")
    assert message.tool_calls and all(c["name"] == "get_weather" and "city" in c["args"] for c in message.tool_calls)


@pytest.mark.parametrize("mode", ["TOOLS", "TOOLS_STRICT", "JSON", "JSON_SCHEMA"])
def test_instructor(client, mode):
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    person = patched.chat.completions.create(
        model=MODEL, response_model=Person, max_retries=0, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Bob is 30 years old. Extract the person."}],
    )  # fmt: skip
    assert isinstance(person, Person)


def test_pydantic_ai_agent_with_a_tool_and_a_typed_result(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.url("/v1"), api_key="unused"))
    agent = Agent(model, output_type=Person, model_settings={"temperature": 0, "max_tokens": 100})

    @agent.tool_plain
    def get_age(name: str) -> int:
        """The age of a person, by name."""
        return 30

    result = agent.run_sync("Bob is 30 years old. Give the final result.", usage_limits=UsageLimits(request_limit=4))
    assert isinstance(result.output, Person)
    offered = result.all_messages()[1]  # the model's answer: a call of the output tool
    assert any(getattr(p, "tool_name", None) == "final_result" for p in offered.parts)


def test_completions_take_the_same_constraints_n_and_logit_bias(client):
    reply = client.completions.create(model=MODEL, prompt="Is water wet? Answer:", max_tokens=6, temperature=0.7,
                                      seed=4, n=2, extra_body={"guided_choice": [" yes", " no"]})  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1] and all(c.text in (" yes", " no") for c in reply.choices)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    text = client.completions.create(model=MODEL, prompt="A digit as JSON:", max_tokens=20, temperature=0,
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "digit", "schema": schema}}}).choices[0].text  # fmt: skip
    assert 0 <= json.loads(text)["n"] <= 9
