"""Constrained output: a JSON schema, any JSON object, or a GBNF grammar, as one GBNF grammar
that llama.cpp's grammar sampler enforces token by token, and the check of the result.

Schemas become grammars with llama.cpp's own converter (llama-cpp-python's
`llama_grammar.json_schema_to_gbnf`). The converter enforces a subset of JSON Schema and
passes over the rest in silence (`patternProperties` becomes any object, `uniqueItems` is
ignored): a schema that uses a keyword outside that subset is refused here, naming where, so
a job is never accepted whose output the grammar cannot hold to. The result is parsed and
validated with the `jsonschema` package all the same.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# What llama.cpp's converter enforces (its grammars/README.md, "JSON Schema to GBNF"), and the
# annotations it may ignore because they constrain nothing.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "format",
}
ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples",
               "readOnly", "writeOnly", "deprecated", "strict"}
FORMATS = {"date", "time", "date-time", "uuid"}  # the string formats the converter knows
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
MAX_GRAMMAR_CHARS = 65_536


class ConstraintError(ValueError):
    """A constraint tokenpool cannot enforce; `field` names where, for the 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    name: str = Field("output", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema to follow")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON of a schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def output_schema(self) -> dict[str, Any] | None:
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


def check_schema(schema: Any, where: str) -> None:
    """Refuse what the converter would not enforce, naming the first such place."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(where, "a schema is a JSON object")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise ConstraintError(f"{where}.{key}", f"{key!r} is not supported in a schema "
                                  f"(supported: {', '.join(sorted(ENFORCED))})")
        if key == "format" and value not in FORMATS:
            raise ConstraintError(f"{where}.format", f"format {value!r} is not supported "
                                  f"(supported: {', '.join(sorted(FORMATS))})")
        if key == "$ref" and not str(value).startswith("#"):
            raise ConstraintError(f"{where}.$ref", "only local references (#/...) are allowed")
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{where}.{key}.{name}")
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}.{key}[{i}]")
        elif key in ("items", "additionalProperties") and isinstance(value, dict | bool):
            check_schema(value, f"{where}.{key}")


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """The GBNF grammar of `schema` (llama.cpp's converter); ConstraintError names the field.
    Each process converts a schema once (about 2 ms each time otherwise): the API checks it
    at admission and the worker samples under it, and a batch's items mostly share one. The
    key keeps the properties' order, which is the order the grammar writes them in."""
    return _schema_grammar(json.dumps(schema), where)


@functools.lru_cache(maxsize=256)
def _schema_grammar(text: str, where: str) -> str:
    import jsonschema
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in exc.absolute_path)
        raise ConstraintError(f"{where}{path}", f"not a valid JSON schema: {exc.message}") \
            from None
    check_schema(schema, where)
    try:
        return str(json_schema_to_gbnf(text))
    except Exception as exc:  # the converter asserts, or trips over a malformed schema
        raise ConstraintError(where, f"cannot be turned into a grammar: "
                              f"{type(exc).__name__}: {exc}") from None


def validate_output(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(the parsed JSON, None) when `text` is JSON valid against `schema`, else (None or the
    parsed value, why not)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} at character {exc.pos}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.SchemaError as exc:  # refused at submit; a job from before that check
        return value, f"the schema is not valid: {exc.message}"
    except jsonschema.ValidationError as exc:
        path = "".join(f"[{p!r}]" for p in exc.absolute_path)
        return value, f"does not match the schema at {path or 'the top'}: {exc.message}"
    return value, None
