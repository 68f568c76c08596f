"""The gateway's OpenAPI document (3.0.3, what the bundled Swagger UI renders), by hand.

Written out rather than generated: raw image bodies and multipart uploads are the API's
heart, and a generator would describe them less exactly than these lines. A test checks it
against the OpenAPI schema and against the gateway's routes, so the two can't drift apart.
"""

from __future__ import annotations

from typing import Any

from producer.client import MAX_LABEL_CHARS
from producer.images import ALLOWED_FORMATS
from producer.settings import Settings
from producer.wire import (
    MAX_DEADLINE_S,
    MAX_JOB_ID_CHARS,
    MAX_JOBS_PER_MESSAGE,
    NAME_PATTERN,
    PRIORITIES,
)

#: A job id in a URL: printable ASCII without ``/``, not starting with ``.`` (so never ``.``
#: or ``..``, which clients fold away), at most MAX_JOB_ID_CHARS characters. Narrower than the
#: wire's rule (printable text): Batchery's own ids are UUID4s. The gateway checks exactly this.
JOB_ID_PATTERN = f"^[ -,0-~-][ -.0-~]{{0,{MAX_JOB_ID_CHARS - 1}}}$"
#: A model name (the wire's rule) and a version (the registry numbers them).
MODEL_PATTERN = f"^{NAME_PATTERN.pattern}$"
VERSION_PATTERN = "^[0-9]{1,64}$"

#: The Content-Types a raw image body may carry (the bytes decide the format).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "application/octet-stream")


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
        }
    return response


def _field(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def document(settings: Settings, webhooks: bool = True) -> dict[str, Any]:
    """The OpenAPI document of a gateway with these settings.

    ``webhooks``: the gateway takes ``callback_url`` (it also needs BATCHERY_WEBHOOK_SECRET);
    without, the field is not in the document and the gateway refuses it.
    """
    job_fields: dict[str, tuple[dict[str, Any], str]] = {
        "model": (
            {"type": "string", "pattern": MODEL_PATTERN},
            "model name (default: the workers' default model); 400 if not published",
        ),
        "version": (
            {"type": "string", "pattern": VERSION_PATTERN},
            "model version (default: the promoted one); 400 if not published",
        ),
        "priority": (
            {"type": "string", "enum": list(PRIORITIES), "default": "normal"},
            "workers take higher work first",
        ),
        "deadline_s": (
            {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": MAX_DEADLINE_S},
            "answer EXPIRED, uncomputed, if not started within this many seconds",
        ),
        "explain": (
            {"type": "boolean", "default": False},
            "the result also carries an attribution map (a PNG) for its label",
        ),
    }
    if webhooks and settings.webhook_secret is not None:
        job_fields["callback_url"] = (
            {"type": "string", "format": "uri", "maxLength": 2048},
            "POST the result here once answered (signed; see docs/http.md); 400 if its "
            "address is not allowed (BATCHERY_WEBHOOK_ALLOW)",
        )
    auth: list[dict[str, list[str]]] = [{"apiKey": []}] if settings.api_keys else []
    unauthorized = {"401": _error("no API key, or not a known one")} if settings.api_keys else {}
    limited = {"429": _error("this key's rate limit is spent", retry_after=True)}
    # What a client does next with a submitted job, from the body (one job or many: the
    # Location header names only a lone job's).
    first = {"job_id": "$response.body#/jobs/0/job_id"}
    job_links = {
        "GetJob": {"operationId": "getJob", "parameters": first},
        "CancelJob": {"operationId": "cancelJob", "parameters": first},
        "GiveFeedback": {"operationId": "giveFeedback", "parameters": first},
    }
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_PATTERN, "maxLength": MAX_JOB_ID_CHARS},
        "description": "a job id as submitting answered it (Batchery's are UUID4s)",
    }
    form_properties: dict[str, Any] = {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": MAX_JOBS_PER_MESSAGE,
            "description": "one or more image files, in the order their ids come back",
        },
        **{name: {**schema, "description": text} for name, (schema, text) in job_fields.items()},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Batchery",
            "version": "1",
            "description": "Classify images as asynchronous jobs: submit, then poll or wait "
            "for the result, or have it POSTed to a callback. Accepted formats: "
            f"{', '.join(sorted(ALLOWED_FORMATS))}; at most {settings.max_image_bytes} bytes "
            f"and {settings.max_image_pixels} pixels an image.",
        },
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit images as jobs",
                    "operationId": "submitJobs",
                    "security": auth,
                    "parameters": [
                        *(_field(n, s, t) for n, (s, t) in job_fields.items()),
                        _field(
                            "wait",
                            {"type": "number", "minimum": 0},
                            "wait up to this many seconds for the answers: 200 with them "
                            f"if all come in time (more is cut to {settings.http_max_wait_s:g})",
                        ),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            **{
                                kind: {"schema": {"type": "string", "format": "binary"}}
                                for kind in IMAGE_TYPES
                            },
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": form_properties,
                                    "required": ["images"],
                                },
                            },
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "with wait: every job answered, each with its result",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                            "links": job_links,
                        },
                        "202": {
                            "description": "accepted: a job per image, in input order (with "
                            "wait: the results that came in time)",
                            "headers": {
                                "Location": {
                                    "description": "the job's URL (when one image was sent)",
                                    "schema": {"type": "string"},
                                }
                            },
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                            "links": job_links,
                        },
                        # Also for requests this schema lets through: whether bytes are an
                        # image, a model is published or a callback's address allowed is
                        # not something a JSON Schema can say.
                        "400": _error(
                            "not an image, a field the wire refuses, a model or version not "
                            "published, a callback address not allowed"
                        ),
                        **unauthorized,
                        "413": _error("an image over the byte limit, or a body over the cap"),
                        "415": _error(
                            "a format outside the allow-list (a GIF, named from its bytes), or "
                            "a Content-Type that is neither an image nor multipart"
                        ),
                        "429": _error(
                            "the queue is full, or this key's rate is spent", retry_after=True
                        ),
                        "503": _error("Redis is unreachable", retry_after=True),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job's result (PENDING until answered)",
                    "operationId": "getJob",
                    "security": auth,
                    "parameters": [
                        job_id,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0},
                            "description": "answer as soon as the result lands, waiting up to "
                            f"this many seconds (more is cut to {settings.http_max_wait_s:g})",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the result (the dict a Celery client reads)",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Result"}
                                }
                            },
                        },
                        "400": _error("not a job id, or a bad wait"),
                        **unauthorized,
                        "404": _error("no such job"),
                        **limited,
                        "503": _error("Redis is unreachable", retry_after=True),
                    },
                },
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a job not yet computed",
                    "description": "Cancelling is not deleting: the job stays, and GET answers "
                    "its CANCELLED result (or, if it was already answered, that answer) until "
                    "it expires with the other results.",
                    "operationId": "cancelJob",
                    "security": auth,
                    "parameters": [job_id],
                    "responses": {
                        "200": {
                            "description": "cancelled: its result is CANCELLED (now, or already)",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Result"}
                                }
                            },
                        },
                        "400": _error("not a job id"),
                        **unauthorized,
                        "404": _error("no such job"),
                        "409": {
                            "description": "already answered: its result is kept",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Result"}
                                }
                            },
                        },
                        **limited,
                        "503": _error("Redis is unreachable", retry_after=True),
                    },
                },
            },
            "/v1/jobs/{job_id}/feedback": {
                "post": {
                    "summary": "Give an answered job's true label",
                    "description": "Counts the job's answer right or wrong for its model "
                    "version: live accuracy and a confusion matrix in batchery monitor. One "
                    "feedback a job; the label must be one of the version's labels.",
                    "operationId": "giveFeedback",
                    "security": auth,
                    "parameters": [job_id],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FeedbackRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "recorded: the label given, the one predicted",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Feedback"}
                                }
                            },
                        },
                        # Also for bodies this schema lets through: whether a label is one of
                        # the job's model version's is not something a JSON Schema can say.
                        "400": _error(
                            "not a job id, a body without a label, or a label the job's model "
                            "version does not have"
                        ),
                        **unauthorized,
                        "404": _error("no such job"),
                        "409": _error(
                            "not answered yet, answered without a prediction (FAILURE, "
                            "EXPIRED, CANCELLED), or its feedback already given"
                        ),
                        "413": _error("a body over the cap"),
                        "415": _error("a body that is not application/json"),
                        **limited,
                        "503": _error("Redis is unreachable", retry_after=True),
                    },
                },
            },
            "/v1/models": {
                "get": {
                    "summary": "Every version of every model (batchery models list --json)",
                    "operationId": "listModels",
                    "security": auth,
                    "responses": {
                        "200": {
                            "description": "one object per version",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "array", "items": {"type": "object"}}
                                }
                            },
                        },
                        **unauthorized,
                        **limited,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The gateway process answers",
                    "operationId": "healthz",
                    "responses": {"200": {"description": "alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Redis answers and at least one worker is alive",
                    "operationId": "readyz",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready, and why"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Accepted": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["job_id", "location"],
                                "properties": {
                                    "job_id": {"type": "string"},
                                    "location": {"type": "string"},
                                    "file": {"type": "string"},
                                    "result": {"$ref": "#/components/schemas/Result"},
                                },
                            },
                        }
                    },
                },
                "FeedbackRequest": {
                    "type": "object",
                    "required": ["label"],
                    "properties": {
                        "label": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_LABEL_CHARS,
                            "description": "the job's true class, as its model names it "
                            "(printable text: no tab or newline)",
                        }
                    },
                    "additionalProperties": False,
                },
                "Feedback": {
                    "type": "object",
                    "required": ["job_id", "model", "version", "label", "predicted", "correct"],
                    "properties": {
                        "job_id": {"type": "string"},
                        "model": {"type": "string"},
                        "version": {"type": "string"},
                        "label": {"type": "string", "description": "the true label given"},
                        "predicted": {"type": "string", "description": "the job's answer"},
                        "correct": {"type": "boolean"},
                    },
                },
                "Result": {
                    "type": "object",
                    "required": ["job_id", "status"],
                    "properties": {
                        "job_id": {"type": "string"},
                        "status": {
                            "type": "string",
                            "enum": ["PENDING", "SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"],
                        },
                        "model": {"type": "string", "nullable": True},
                        "version": {"type": "string", "nullable": True},
                        "label": {"type": "string", "nullable": True},
                        "class_index": {"type": "integer", "nullable": True},
                        "score": {"type": "number", "nullable": True},
                        "top_k": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "label": {"type": "string"},
                                    "score": {"type": "number"},
                                },
                            },
                        },
                        "error": {"type": "string", "nullable": True},
                        "batch_size": {"type": "integer", "nullable": True},
                        "explanation": {"type": "object"},
                    },
                },
            },
        },
    }
