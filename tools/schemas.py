"""The published event contract, generated from the models in ``shared.events``:

- ``schemas/events/<type>.json``: one JSON Schema (draft-07) per event type on a topic — the
  CloudEvents envelope with that type's ``data`` — for the contract's input and output types
  and the dead letter;
- ``docs/asyncapi.yaml``: an AsyncAPI 3.0 document of every topic, which service sends and
  receives what on it, the Kafka bindings (key = customer id) and the content-type header,
  its messages' payloads referencing those schemas.

``python -m tools.schemas`` writes them; ``--check`` exits 1 naming every file that is not
what the models make now (the tests run the same comparison).

Input types are described as creditwatch reads them (validation: a money amount may be a
decimal string or an exact JSON number), output types as it writes them (serialization:
money is always a decimal string). The services' own events (credit checks, overrides,
requests, holds, acknowledgements, the scheduler's facts) are not here: they live only in
each service's event store, never on a topic, and are no part of the contract.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from services.alerts.handlers import AlertsService
from services.assessment.handlers import AssessmentService
from services.limits.handlers import LimitsService
from shared.events import (
    INPUT_MODELS,
    MODEL_OF_TYPE,
    OUTPUT_MODELS,
    STRUCTURED_CONTENT_TYPE,
    TOPIC_OF_TYPE,
    EventData,
    EventDeadLettered,
)

ROOT: Final = Path(__file__).resolve().parent.parent
SCHEMA_DIR: Final = Path("schemas/events")
ASYNCAPI_FILE: Final = Path("docs/asyncapi.yaml")
DRAFT_07: Final = "http://json-schema.org/draft-07/schema#"
KAFKA_BINDING: Final = "0.5.0"

# What each service consumes (its handlers' types) and publishes (on its own topics, plus
# its dead letters). Publishing is decided in the handlers and domains, not declared in
# one place: tests/unit/test_event_schemas.py holds this to what the services emit.
CONSUMES: Final[Mapping[str, frozenset[str]]] = {
    "assessment": AssessmentService.consumed_types,
    "limits": LimitsService.consumed_types,
    "alerts": AlertsService.consumed_types,
}
PUBLISHES: Final[Mapping[str, tuple[str, ...]]] = {
    "assessment": ("assessment.completed", EventDeadLettered.TYPE),
    "limits": ("exposure.updated", "limit.changed", EventDeadLettered.TYPE),
    "alerts": ("alert.raised", "alert.updated", "alert.resolved", EventDeadLettered.TYPE),
}

SUMMARIES: Final[Mapping[str, str]] = {
    "customer.registered": "A customer was created in the CRM (master data).",
    "customer.updated": "A customer's master data changed.",
    "invoice.issued": "An invoice was issued to a customer.",
    "invoice.cancelled": "An invoice was cancelled.",
    "credit_note.issued": "A credit note was issued, optionally against an invoice.",
    "payment.received": "A payment was received, optionally allocated to invoices.",
    "payment.reversed": "A payment was reversed (bounced, charged back).",
    "invoice.overdue": "The dunning system reports an invoice overdue as of a date.",
    "financial_statement.published": "A customer's financial statement for a period.",
    "credit_report.received": "A credit bureau's report on a customer.",
    "assessment.completed": "A customer's risk was (re)assessed: score, grade, factors.",
    "limit.changed": "A customer's credit limit changed.",
    "exposure.updated": "A customer's exposure figures changed.",
    "alert.raised": "An early-warning alert was raised.",
    "alert.updated": "An open alert changed (severity, facts, acknowledgement).",
    "alert.resolved": "An alert's condition cleared.",
    "event.dead_lettered": "A record a service could not process, set aside with the reason.",
}
TOPIC_SUMMARIES: Final[Mapping[str, str]] = {
    "crm.customers": "Customer master data.",
    "ar.invoices": "Invoices and credit notes (accounts receivable).",
    "ar.payments": "Payments and their reversals.",
    "ar.overdue": "Overdue notices from the dunning system.",
    "crm.financials": "Customers' financial statements.",
    "crm.credit-reports": "Credit bureau reports.",
    "credit.assessments": "Risk assessments (assessment service).",
    "credit.limits": "Credit limit changes (limits service).",
    "credit.exposure": "Exposure figures (limits service).",
    "credit.alerts": "Early-warning alerts (alerts service).",
    "credit.dlq": "Dead letters: what a service could not process, under its own name.",
}
TOPIC_SETTINGS: Final[Mapping[str, str]] = {
    "crm.customers": "CREDITWATCH_TOPIC_CUSTOMERS",
    "ar.invoices": "CREDITWATCH_TOPIC_INVOICES",
    "ar.payments": "CREDITWATCH_TOPIC_PAYMENTS",
    "ar.overdue": "CREDITWATCH_TOPIC_OVERDUE",
    "crm.financials": "CREDITWATCH_TOPIC_FINANCIALS",
    "crm.credit-reports": "CREDITWATCH_TOPIC_CREDIT_REPORTS",
    "credit.assessments": "CREDITWATCH_TOPIC_ASSESSMENTS",
    "credit.limits": "CREDITWATCH_TOPIC_LIMITS",
    "credit.exposure": "CREDITWATCH_TOPIC_EXPOSURE",
    "credit.alerts": "CREDITWATCH_TOPIC_ALERTS",
    "credit.dlq": "CREDITWATCH_TOPIC_DLQ",
}

_INPUT_TYPES: Final = frozenset(model.TYPE for model in INPUT_MODELS)
_OUTPUT_TYPES: Final = frozenset(model.TYPE for model in OUTPUT_MODELS)
TYPES: Final[tuple[str, ...]] = tuple(model.TYPE for model in (*INPUT_MODELS, *OUTPUT_MODELS))
TOPICS: Final[tuple[str, ...]] = tuple(dict.fromkeys(TOPIC_OF_TYPE[t] for t in TYPES))

_TRACEPARENT_SCHEMA: Final = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$",
    "description": (
        "W3C Trace Context traceparent (CloudEvents distributed-tracing extension). An "
        "output event derived from an input event carries the input's on, unchanged; an "
        "invalid one is ignored, as the W3C specification asks."
    ),
}
_TRACESTATE_SCHEMA: Final = {
    "type": "string",
    "maxLength": 512,
    "description": "W3C Trace Context tracestate; carried on with a valid traceparent.",
}


def is_output(type_: str) -> bool:
    return type_ in _OUTPUT_TYPES


def _data_schema(model: type[EventData], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's schema with its nested definitions under draft-07's ``definitions``."""
    schema = model.model_json_schema(
        mode="serialization" if mode == "serialization" else "validation",
        ref_template="#/definitions/{model}",
    )
    definitions = schema.pop("$defs", {})
    return schema, definitions


def event_schema(type_: str) -> dict[str, Any]:
    """The JSON Schema (draft-07) of one event type: the envelope with its ``data``."""
    model = MODEL_OF_TYPE[type_]
    output = is_output(type_)
    data, definitions = _data_schema(model, "serialization" if output else "validation")
    name = model.__name__
    definitions[name] = data
    topic = TOPIC_OF_TYPE[type_]
    if output:
        written = "written by creditwatch (money as decimal strings)"
    else:
        written = (
            "as creditwatch reads it (money as decimal strings, or JSON numbers parsed "
            "exactly; unknown data fields are ignored)"
        )
    subject = "The customer id; also the Kafka record's key."
    if type_ == EventDeadLettered.TYPE:
        subject = "The dead-lettered record's key as text (its customer id), or 'unknown'."
    return {
        "$schema": DRAFT_07,
        "title": type_,
        "description": (
            f"{SUMMARIES[type_]} A CloudEvents 1.0 event in structured JSON mode on topic "
            f"{topic} (default name), {written}. Generated from shared/events.py by "
            "`python -m tools.schemas`; see docs/contract.md."
        ),
        "type": "object",
        "properties": {
            "specversion": {"type": "string", "const": "1.0"},
            "id": {
                "type": "string",
                "minLength": 1,
                "description": "Unique per source: the idempotency key.",
            },
            "source": {
                "type": "string",
                "minLength": 1,
                "description": (
                    "/creditwatch/<service>" if output else "The producing system (URI-reference)."
                ),
            },
            "type": {"type": "string", "const": type_},
            "subject": {"type": "string", "minLength": 1, "description": subject},
            "time": {
                "type": "string",
                "format": "date-time",
                "description": "Business time, RFC 3339 with an offset (UTC, 'Z', when written).",
            },
            "datacontenttype": (
                {"type": "string", "const": "application/json"}
                if output
                else {
                    "type": "string",
                    "default": "application/json",
                    "description": "A JSON media type (application/json or */*+json).",
                }
            ),
            "data": {"$ref": f"#/definitions/{name}"},
            "traceparent": _TRACEPARENT_SCHEMA,
            "tracestate": _TRACESTATE_SCHEMA,
        },
        "required": ["specversion", "id", "source", "type", "subject", "time", "data"],
        "additionalProperties": {
            "description": (
                "Other CloudEvents extension attributes: kept with the event, not carried on."
            )
        },
        "definitions": dict(sorted(definitions.items())),
    }


def schema_path(type_: str) -> Path:
    return SCHEMA_DIR / f"{type_}.json"


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)}


def _message(type_: str) -> dict[str, Any]:
    output = is_output(type_)
    content_type: dict[str, Any] = {
        "type": "string",
        "description": (
            "The CloudEvents Kafka binding's structured content mode: the value is a whole "
            "CloudEvent in JSON. A reader following the binding takes a record without it "
            "for binary mode (attributes in ce_* headers) and misreads it."
        ),
    }
    if output:
        content_type["const"] = STRUCTURED_CONTENT_TYPE
    else:
        content_type["pattern"] = "^application/cloudevents\\+json"
        content_type["description"] += (
            " creditwatch reads the value as structured mode either way; producers should "
            "set it for other readers."
        )
    headers: dict[str, Any] = {"type": "object", "properties": {"content-type": content_type}}
    if output:
        headers["required"] = ["content-type"]
    return {
        "name": type_,
        "title": type_,
        "summary": SUMMARIES[type_],
        "contentType": "application/cloudevents+json",
        "headers": headers,
        "payload": {
            "schemaFormat": "application/schema+json;version=draft-07",
            "schema": {"$ref": f"../{schema_path(type_).as_posix()}"},
        },
        "correlationId": {
            "description": "The CloudEvents id (unique per source).",
            "location": "$message.payload#/id",
        },
        "bindings": {
            "kafka": {
                "key": {
                    "type": "string",
                    "minLength": 1,
                    "description": (
                        "The customer id (UTF-8), equal to the event's subject: one customer's "
                        "events keep their order within a partition."
                    ),
                },
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }


def _types_on(topic: str, types: Iterable[str]) -> list[str]:
    return [t for t in TYPES if t in set(types) and TOPIC_OF_TYPE[t] == topic]


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic: channels, operations, messages."""
    channels: dict[str, Any] = {}
    for topic in TOPICS:
        channels[topic] = {
            "address": topic,
            "title": topic,
            "summary": TOPIC_SUMMARIES[topic],
            "description": (
                f"Default name; set another with {TOPIC_SETTINGS[topic]}. Keyed by customer id."
            ),
            "messages": {
                t: _ref("components", "messages", t) for t in TYPES if TOPIC_OF_TYPE[t] == topic
            },
            "bindings": {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDING}},
        }
    operations: dict[str, Any] = {}
    for service in PUBLISHES:
        for topic in TOPICS:
            sent = _types_on(topic, PUBLISHES[service])
            if sent:
                operations[f"{service}.send.{topic}"] = {
                    "action": "send",
                    "channel": _ref("channels", topic),
                    "title": f"{service} publishes to {topic}",
                    "summary": (
                        f"Through its outbox relay, source /creditwatch/{service}: in order "
                        "per customer, at least once (stable ids), idempotent producer."
                    ),
                    "messages": [_ref("channels", topic, "messages", t) for t in sent],
                }
    for service in PUBLISHES:
        for topic in TOPICS:
            received = _types_on(topic, CONSUMES[service])
            if received:
                operations[f"{service}.receive.{topic}"] = {
                    "action": "receive",
                    "channel": _ref("channels", topic),
                    "title": f"{service} consumes {topic}",
                    "summary": (
                        "Other types on the topic are skipped and counted; a record it cannot "
                        "process goes to credit.dlq under its name."
                    ),
                    "messages": [_ref("channels", topic, "messages", t) for t in received],
                    "bindings": {
                        "kafka": {
                            "groupId": {
                                "type": "string",
                                "enum": [f"creditwatch-{service}"],
                                "description": (
                                    f"<CREDITWATCH_CONSUMER_GROUP_PREFIX>-{service}; the "
                                    "prefix defaults to creditwatch."
                                ),
                            },
                            "bindingVersion": KAFKA_BINDING,
                        }
                    },
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "creditwatch events",
            "version": "1",
            "description": (
                "The topics creditwatch consumes and publishes (contract v1, docs/contract.md "
                "§1). Every value is a CloudEvents 1.0 event in structured JSON mode; every "
                "record creditwatch publishes carries the header content-type: "
                f"{STRUCTURED_CONTENT_TYPE}. Output events carry on the W3C trace context "
                "(traceparent, tracestate) of the event that caused them. Generated by "
                "`python -m tools.schemas` from shared/events.py; do not edit."
            ),
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "kafka": {
                "host": "{bootstrap}",
                "protocol": "kafka",
                "description": (
                    "The Kafka cluster (PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL: "
                    "CREDITWATCH_KAFKA_SECURITY_PROTOCOL and the settings beside it)."
                ),
                "variables": {
                    "bootstrap": {
                        "default": "127.0.0.1:9092",
                        "description": "CREDITWATCH_KAFKA_BOOTSTRAP",
                    }
                },
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": {t: _message(t) for t in TYPES}},
    }


_HEADER: Final = (
    "# Generated by `python -m tools.schemas` from shared/events.py: do not edit by hand.\n"
)


def rendered() -> dict[Path, str]:
    """Every generated file (relative to the repository root) and its text."""
    files = {
        schema_path(t): json.dumps(event_schema(t), indent=2, ensure_ascii=False) + "\n"
        for t in TYPES
    }
    files[ASYNCAPI_FILE] = _HEADER + yaml.safe_dump(
        asyncapi_document(), sort_keys=False, allow_unicode=True, width=100
    )
    return files


def stale(root: Path = ROOT) -> list[str]:
    """What differs from what the models make now: files changed, missing, or left over."""
    files = rendered()
    problems = []
    for path, text in files.items():
        target = root / path
        if not target.is_file():
            problems.append(f"{path}: missing")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: not what the models make now")
    folder = root / SCHEMA_DIR
    if folder.is_dir():
        for extra in sorted(folder.glob("*.json")):
            if extra.relative_to(root) not in files:
                problems.append(f"{extra.relative_to(root)}: no event type has it")
    return problems


def write(root: Path = ROOT) -> list[Path]:
    files = rendered()
    (root / SCHEMA_DIR).mkdir(parents=True, exist_ok=True)
    for extra in (root / SCHEMA_DIR).glob("*.json"):
        if extra.relative_to(root) not in files:
            extra.unlink()
    written = []
    for path, text in files.items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.schemas",
        description="Write the event JSON Schemas (schemas/events/) and docs/asyncapi.yaml.",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m tools.schemas` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
