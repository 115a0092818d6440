"""Schemas to grammars, what cannot be enforced named, results checked (broker.constraints),
and the tools answer's schema and its calls (api/tools.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api.tools import NamedChoice, Tool, answer_schema, calls_of, chosen
from broker.constraints import ConstraintError, schema_grammar, validate_output
from broker.messages import GenerateJob
from workers.runners import checked_output

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def job(**extra: object) -> GenerateJob:
    return GenerateJob.model_validate({"kind": "generate", "prompt": "p", **extra})


def test_a_schema_becomes_a_grammar_with_a_root_rule() -> None:
    grammar = schema_grammar(PERSON, "schema")
    assert grammar.startswith("age-kv ::=") or "root ::=" in grammar
    assert '"\\"name\\""' in grammar


def test_a_schema_is_converted_once_per_process_keeping_its_properties_order() -> None:
    from broker.constraints import _schema_grammar

    schema = {"type": "object", "properties": {"zeta": {"type": "string"},
                                               "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"]}
    first = schema_grammar(schema, "schema")
    hits = _schema_grammar.cache_info().hits
    assert schema_grammar(json.loads(json.dumps(schema)), "schema") == first
    assert _schema_grammar.cache_info().hits == hits + 1
    flipped = {**schema, "properties": dict(reversed(schema["properties"].items()))}
    root = next(line for line in schema_grammar(flipped, "schema").splitlines()
                if line.startswith("root ::="))
    assert root.index("alpha") < root.index("zeta")  # the order is part of the key
    root = next(line for line in first.splitlines() if line.startswith("root ::="))
    assert root.index("zeta") < root.index("alpha")


@pytest.mark.parametrize(("schema", "field"), [
    ({"type": "object", "patternProperties": {"^a": {}}}, "s.patternProperties"),
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
     "s.properties.tags.uniqueItems"),
    ({"anyOf": [{"type": "string", "format": "email"}]}, "s.anyOf[0].format"),
    ({"$ref": "https://example.com/schema.json"}, "s.$ref"),
    ({"not": {"type": "string"}}, "s.not"),
    ({"type": "strng"}, "s.type"),
])
def test_what_the_grammar_cannot_enforce_is_refused_naming_where(schema, field) -> None:
    with pytest.raises(ConstraintError) as caught:
        schema_grammar(schema, "s")
    assert caught.value.field == field


def test_a_job_names_its_constraint_field_and_takes_one_constraint_at_most() -> None:
    bad = job(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object", "properties": {"x": {"not": {}}}}}})
    with pytest.raises(ConstraintError) as caught:
        bad.constraint()
    assert caught.value.field == "response_format.json_schema.schema.properties.x.not"
    assert "root ::=" in (job(response_format={"type": "json_object"}).constraint() or "")
    assert job(grammar='root ::= "yes" | "no"').constraint() == 'root ::= "yes" | "no"'
    assert job(response_format={"type": "text"}).constraint() is None
    with pytest.raises(ValidationError, match="at most one"):
        job(grammar='root ::= "a"', response_format={"type": "json_object"})
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        job(top_logprobs=3)


def test_output_is_valid_only_when_whole_and_matching_the_schema() -> None:
    constrained = job(response_format={"type": "json_schema",
                                       "json_schema": {"name": "p", "schema": PERSON}})
    good = '{"name": "Ada", "age": 36}'
    assert checked_output(constrained, good, "stop") == {
        "json": {"name": "Ada", "age": 36}, "valid": True}
    cut = checked_output(constrained, '{"name": "Ada", "a', "length")
    assert cut["valid"] is False and cut["invalid_reason"].startswith("incomplete")
    assert checked_output(constrained, good, "length")["valid"] is False  # cut: never valid
    wrong = checked_output(constrained, '{"name": "Ada", "age": -1}', "stop")
    assert wrong["valid"] is False and "['age']" in wrong["invalid_reason"]
    assert validate_output("no json", PERSON)[1].startswith("not JSON")
    assert checked_output(job(), "free text", "stop") == {}


WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}})
TIME = Tool.model_validate({"type": "function", "function": {"name": "time"}})


def test_tool_choice_picks_the_answers_schema() -> None:
    assert chosen([WEATHER, TIME], "none") is None
    named = NamedChoice.model_validate({"type": "function", "function": {"name": "time"}})
    assert [f.name for f in chosen([WEATHER, TIME], named)] == ["time"]
    required = answer_schema([WEATHER.function], "required", parallel=False)
    assert required["required"] == ["tool_calls"]
    assert required["properties"]["tool_calls"]["maxItems"] == 1
    auto = answer_schema([WEATHER.function, TIME.function], "auto", parallel=True)
    assert [s["required"] for s in auto["anyOf"]] == [["tool_calls"], ["response"]]
    assert "maxItems" not in auto["anyOf"][0]["properties"]["tool_calls"]
    schema_grammar(auto, "tools")  # the converter takes it


def test_a_tools_answer_becomes_openai_tool_calls_or_content() -> None:
    calls, content = calls_of("j1", json.dumps({"tool_calls": [
        {"name": "weather", "arguments": {"city": "Oslo"}}]}))
    assert content is None and calls == [{"id": "call_j1_0", "type": "function", "function": {
        "name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert calls_of("j1", '{"response": "Hello"}') == (None, "Hello")
    assert calls_of("j1", '{"tool_calls": [{"na') == (None, '{"tool_calls": [{"na')


def test_a_schema_that_is_not_json_schema_is_refused_naming_where() -> None:
    with pytest.raises(ConstraintError) as caught:
        schema_grammar({"type": "object", "properties": {"a": {"enum": "x"}}}, "s")
    assert caught.value.field == "s.properties.a.enum"
    with pytest.raises(ConstraintError, match="not a valid JSON schema"):
        schema_grammar({"items": 5, "type": "array"}, "s")
