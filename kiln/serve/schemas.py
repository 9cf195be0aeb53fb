"""What a ``POST /predict`` body may hold, per task, and the JSON the API answers with.

A request is checked here by hand rather than by pydantic, for messages that name the field at fault
(``inputs[3].question: field required``) and for the HTTP status each problem deserves (400 for
text that is not JSON, 422 for JSON of the wrong shape). The pydantic models below only describe
the same rules in the OpenAPI schema (``/docs``, and what clients and fuzzers generate from).

An input item is a string, in the form ``kiln predict`` reads from stdin, or an object with the keys
Hugging Face pipelines and classy use for the task, as the task declares them (``request_forms``);
a task that declares none takes strings, which its ``parse_input`` reads.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from kiln.config import iter_settings, setting_type
from kiln.tasks import task_class


class RequestError(Exception):
    """A request the API refuses: ``status`` (400, 401, 413, 422, 503...), the ``field`` at fault
    (``inputs[3].question``) when there is one, and a message."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.kind = kind or ERROR_KINDS.get(status, "error")


ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "payload_too_large", 422: "validation", 500: "internal", 503: "unavailable"}


def error_body(status: int, message: str, field: str | None = None, kind: str | None = None) -> dict:
    """The one JSON shape of every error answer."""
    text = f"{field}: {message}" if field else message
    return {"error": text, "error_type": kind or ERROR_KINDS.get(status, "error"), "field": field}


# Deeper nesting is refused before parsing. Python's parser recurses, so without a bound of kiln's own
# the limit would be the interpreter's recursion limit, which torch.compile's import raises.
MAX_DEPTH = 100
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(body: bytes) -> int:
    """How deeply ``body``'s arrays and objects nest (brackets inside strings do not count), in C-speed
    passes: a 1 MB body costs milliseconds."""
    import numpy as np

    codes = np.frombuffer(_STRINGS.sub(b'""', body), dtype=np.uint8)
    steps = np.isin(codes, (91, 123)).astype(np.int32) - np.isin(codes, (93, 125)).astype(np.int32)  # [{ and ]}
    return int(steps.cumsum().max(initial=0))


def parse_json(body: bytes) -> Any:
    """The body as JSON (a RequestError, 400, when it is not: empty, not UTF-8, malformed, NaN, nested
    deeper than :data:`MAX_DEPTH`)."""
    if not body.strip():
        raise RequestError(400, 'empty body; send JSON such as {"inputs": ["a text"]}')
    if json_depth(body) > MAX_DEPTH:
        raise RequestError(400, f"the body is not valid JSON: nested too deeply (more than {MAX_DEPTH} levels)")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise RequestError(400, f"the body is not valid JSON: {reason}") from None


def _kind(value: Any) -> str:
    """A JSON value's type, by JSON's names."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"expected a string, got {_kind(value)}", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
        raise RequestError(422, "not valid Unicode text (a lone surrogate)", where) from None
    return value


def describe(task: str) -> str:
    """What an input item of ``task`` may be, for error messages."""
    objects = " or ".join("an object with " + " and ".join(f'"{k}"' for k in form.required)
                          for form in task_class(task).request_forms)
    return f"a string or {objects}" if objects else "a string"


def check_item(item: Any, task: str, where: str) -> Any:
    """One input item, checked, in the form the task's ``parse_input`` takes."""
    if isinstance(item, str):
        return _text(item, where)
    forms = task_class(task).request_forms
    if not isinstance(item, dict) or not forms:
        raise RequestError(422, f"expected {describe(task)}, got {_kind(item)}", where)
    # The form sharing most keys with the item is the one the client meant.
    form = max(forms, key=lambda f: len(set(f.keys) & set(item)))
    for key in item:
        if key not in form.keys:
            expected = ", ".join(f'"{k}"' for k in form.keys)
            raise RequestError(422, f"unknown field; expected {expected}", f"{where}.{key}")
    for key in form.required:
        if key not in item:
            raise RequestError(422, "field required", f"{where}.{key}")
    for key, value in item.items():
        if key == form.word_list:
            if not isinstance(value, list):
                raise RequestError(422, f"expected an array of strings, got {_kind(value)}", f"{where}.{key}")
            for index, word in enumerate(value):
                _text(word, f"{where}.{key}[{index}]")
        else:
            _text(value, f"{where}.{key}")
    return form.convert(item) if form.convert else dict(item)


def check_request(payload: Any, task: str, max_inputs: int) -> tuple[list[Any], dict[str, Any]]:
    """``(items for parse_input, raw parameters)`` from a parsed body, or a RequestError (422)."""
    if not isinstance(payload, dict):
        raise RequestError(422, f'expected a JSON object such as {{"inputs": [...]}}, got {_kind(payload)}')
    for key in payload:
        if key not in ("inputs", "parameters"):
            raise RequestError(422, 'unknown field; a request has "inputs" and optionally "parameters"', key)
    if "inputs" not in payload:
        raise RequestError(422, "field required", "inputs")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):  # one item on its own, as HF's Inference API takes it
        inputs = [inputs]
    if not inputs:
        raise RequestError(422, "at least one input is required", "inputs")
    if len(inputs) > max_inputs:
        raise RequestError(422, f"at most {max_inputs} inputs per request, got {len(inputs)}", "inputs")
    items = [check_item(item, task, f"inputs[{index}]") for index, item in enumerate(inputs)]
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise RequestError(422, f"expected an object, got {_kind(parameters)}", "parameters")
    return items, parameters


def estimate_tokens(item: Any) -> int:
    """A cheap guess at an item's tokens, for the batch budget (tokenizing here would share the
    tokenizer with the worker thread): about four characters a token, at least one a word."""
    texts = (item if isinstance(item, (list, tuple)) else
             item.values() if isinstance(item, dict) else [item])
    return 2 + sum(max(len(text) // 4, len(text.split())) for text in texts if isinstance(text, str))


# -- the same rules as an OpenAPI description ------------------------------------------------
def request_model(task: str, parameters: dict[str, str], max_inputs: int) -> Any:
    """A pydantic model of the ``/predict`` body for ``task``, its parameters (name -> setting key)
    typed and ranged as the settings declare them."""
    import pydantic

    item: Any = str
    for number, form in enumerate(task_class(task).request_forms):
        fields: dict[str, Any] = {key: (list[str] if key == form.word_list else str, ...) for key in form.required}
        fields.update({key: (str, None) for key in form.optional})  # may be left out, never null
        name = "".join(part.title() for part in task.replace("-", " ").split()) + f"Input{number + 1 if number else ''}"
        model = pydantic.create_model(name, __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        item = item | model
    declared = dict(iter_settings())
    options: dict[str, Any] = {}
    for name, key in parameters.items():
        meta = declared[key].metadata
        kind = setting_type(key)
        # Not nullable: an omitted parameter keeps its default, a null one is refused.
        options[name] = (kind, pydantic.Field(None, description=meta["doc"], ge=meta.get("minimum"),
                                              gt=meta.get("above"), le=meta.get("maximum")))
    params_model = pydantic.create_model("Parameters", __config__=pydantic.ConfigDict(extra="forbid"), **options)
    hint = task_class(task).string_means
    return pydantic.create_model(
        "PredictRequest", __config__=pydantic.ConfigDict(extra="forbid"),
        inputs=(Annotated[list[item], pydantic.Field(min_length=1, max_length=max_inputs)] | item,
                pydantic.Field(..., description=f"Up to {max_inputs} inputs; a string is {hint}. One input on "
                                                "its own is taken as a list of one.")),
        parameters=(params_model | None, pydantic.Field(None, description="Per-call settings, by HF pipeline name; "
                                                                         "GET /info lists them with their defaults.")),
    )


def response_model(task: Any) -> Any:
    """The ``/predict`` answer for ``task`` (a task name, or a loaded task, whose answer may depend on
    what it learnt: a multi-label model's): a list, one prediction per input, as ``kiln predict
    --json`` prints (token: a list of entities per input)."""
    import pydantic

    face = task_class(task) if isinstance(task, str) else task
    if face.prediction_fields is None:
        return list[Any]
    fields: dict[str, Any] = {key: (kind, ...) for key, kind in face.prediction_fields.items()}
    model: Any = pydantic.create_model("Prediction", **fields)
    return list[list[model]] if face.predictions_per_input == "list" else list[model]


def error_model() -> type:
    """The pydantic model of every error answer."""
    import pydantic

    return pydantic.create_model(
        "Error",
        error=(str, pydantic.Field(..., description="What is wrong, with the field first when there is one.")),
        error_type=(str, pydantic.Field(..., description="bad_request, unauthorized, not_found, "
                                        "payload_too_large, validation, unavailable or internal.")),
        field=(str | None, pydantic.Field(None, description="The field at fault, e.g. inputs[3].question.")),
    )
