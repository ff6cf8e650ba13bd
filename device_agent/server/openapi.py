"""The OpenAPI 3.0 document of the agent's HTTP API (served at ``/openapi.json``).

Follows the Open Inference Protocol v2 REST specification with Triton's repository index and
statistics extensions, plus ``/metrics`` and this document.
Kept as data beside the server so schemathesis can check the two against each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeserve import __version__

__all__ = ["openapi_document"]

_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}


def _ok(schema: str) -> dict[str, Any]:
    return {"description": "OK", "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _params(versioned: bool, models: Mapping[str, list[str]] | None) -> list[dict[str, Any]]:
    # A server documents its installed models as enums, so generated requests reach them.
    name: dict[str, Any] = {"type": "string", "enum": sorted(models)} if models else _NAME
    params = [{"name": "model", "in": "path", "required": True, "schema": name}]
    if versioned:
        versions = sorted({v for vs in (models or {}).values() for v in vs})
        schema: dict[str, Any] = {"type": "string", "enum": versions} if versions else {
            "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[0-9A-Za-z.+-]+$"}
        params.append({"name": "version", "in": "path", "required": True, "schema": schema})
    return params


def _model_paths(prefix: str, versioned: bool,
                 models: Mapping[str, list[str]] | None) -> dict[str, Any]:
    errors = {"400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR}
    return {
        prefix: {"get": {"summary": "Model metadata", "parameters": _params(versioned, models),
                         "responses": {"200": _ok("ModelMetadata"), **errors}}},
        f"{prefix}/ready": {"get": {"summary": "Model readiness", "parameters": _params(versioned, models),
                                    "responses": {"200": _ok("Ready"), **errors}}},
        f"{prefix}/stats": {"get": {"summary": "Statistics (Triton's statistics extension)",
                                    "parameters": _params(versioned, models),
                                    "responses": {"200": _ok("ModelStatistics"), **errors}}},
        f"{prefix}/infer": {"post": {
            "summary": "Inference (JSON, or JSON header + binary tensors)",
            "parameters": [*_params(versioned, models), {
                "name": "Inference-Header-Content-Length", "in": "header", "required": False,
                "schema": {"type": "integer", "minimum": 0}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/InferenceRequest"}}}},
            "responses": {"200": _ok("InferenceResponse"), **errors,
                          "413": _ERROR, "415": _ERROR,
                          "503": {**_ERROR, "headers": {"Retry-After": {
                              "schema": {"type": "integer"}}}}}}},
    }


def _tensor(request: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64",
                                                "INT8", "INT16", "INT32", "INT64", "FP16",
                                                "FP32", "FP64", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    }
    required = ["name", "datatype", "shape"]
    return {"type": "object", "properties": props, "required": required}


def openapi_document(models: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call); ``models`` maps installed model names to
    their versions, which then appear as the path parameters' enums."""
    error = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    metadata_tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgeserve agent (Open Inference Protocol v2)", "version": __version__},
        "paths": {
            "/v2/health/live": {"get": {"summary": "Liveness", "security": [],
                                        "responses": {"200": _ok("Live")}}},
            "/v2/health/ready": {"get": {"summary": "Readiness", "security": [],
                                         "responses": {"200": _ok("Ready"), "503": _ok("Ready")}}},
            "/v2": {"get": {"summary": "Server metadata", "responses": {
                "200": _ok("ServerMetadata"), "401": _ERROR, "403": _ERROR}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _ERROR, "403": _ERROR}}},
            "/v2/models/stats": {"get": {"summary": "Statistics of every installed version",
                                         "responses": {"200": _ok("ModelStatistics"),
                                                       "401": _ERROR, "403": _ERROR}}},
            "/v2/repository/index": {"post": {
                "summary": "Installed model versions and whether they are loaded",
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        "ready": {"type": "boolean"}, "repository_name": {"type": "string"}}}}}},
                "responses": {"200": _ok("RepositoryIndex"), "400": _ERROR, "401": _ERROR,
                              "403": _ERROR, "413": _ERROR}}},
            **_model_paths("/v2/models/{model}", False, models),
            **_model_paths("/v2/models/{model}/versions/{version}", True, models),
            "/v2/models/{model}/feedback": {"post": {
                "summary": "Reward and/or true label for a past prediction (experiments)",
                "parameters": _params(False, models),
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Feedback"}}}},
                "responses": {"200": _ok("FeedbackAccepted"), "400": _ERROR, "401": _ERROR,
                              "403": _ERROR, "404": _ERROR, "413": _ERROR}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic"}},
            "schemas": {
                "Error": error,
                "Feedback": {"type": "object", "required": ["id"], "properties": {
                    "id": {"type": "string", "description": "the prediction's id"},
                    "reward": {"type": "number"},
                    "label": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}},
                "FeedbackAccepted": {"type": "object", "required": ["accepted", "model",
                                                                    "model_version"],
                                     "properties": {"accepted": {"type": "boolean"},
                                                    "id": {"type": "string"},
                                                    "model": {"type": "string"},
                                                    "model_version": {"type": "string"}}},
                "RepositoryIndex": {"type": "array", "items": {
                    "type": "object", "required": ["name", "version", "state", "reason"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "state": {"type": "string", "enum": ["READY",
                                                                        "UNAVAILABLE"]},
                                   "reason": {"type": "string"}}}},
                "ModelStatistics": {"type": "object", "required": ["model_stats"], "properties": {
                    "model_stats": {"type": "array", "items": {
                        "type": "object",
                        "required": ["name", "version", "last_inference", "inference_count",
                                     "execution_count", "inference_stats"],
                        "properties": {
                            "name": {"type": "string"}, "version": {"type": "string"},
                            "last_inference": {"type": "integer", "minimum": 0},
                            "inference_count": {"type": "integer", "minimum": 0},
                            "execution_count": {"type": "integer", "minimum": 0},
                            "inference_stats": {"type": "object", "additionalProperties": {
                                "$ref": "#/components/schemas/Duration"}},
                            "batch_stats": {"type": "array", "items": {"type": "object"}}}}}}},
                "Duration": {"type": "object", "required": ["count", "ns"], "properties": {
                    "count": {"type": "integer", "minimum": 0},
                    "ns": {"type": "integer", "minimum": 0}}},
                "Live": {"type": "object", "properties": {"live": {"type": "boolean"}},
                         "required": ["live"]},
                "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}},
                          "required": ["ready"]},
                "ServerMetadata": {"type": "object", "required": ["name", "version",
                                                                  "extensions"],
                                   "properties": {"name": {"type": "string"},
                                                  "version": {"type": "string"},
                                                  "extensions": {"type": "array", "items": {
                                                      "type": "string"}}}},
                "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs",
                                                                 "outputs"],
                                  "properties": {"name": {"type": "string"},
                                                 "versions": {"type": "array",
                                                              "items": {"type": "string"}},
                                                 "platform": {"type": "string"},
                                                 "inputs": {"type": "array",
                                                            "items": metadata_tensor},
                                                 "outputs": {"type": "array",
                                                             "items": metadata_tensor}}},
                "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "parameters": {"type": "object"},
                    "inputs": {"type": "array", "minItems": 1, "items": _tensor(True)},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"},
                                       "parameters": {"type": "object"}}}}}},
                "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"],
                                      "properties": {"model_name": {"type": "string"},
                                                     "model_version": {"type": "string"},
                                                     "id": {"type": "string"},
                                                     "outputs": {"type": "array",
                                                                 "items": _tensor(False)}}},
            },
        },
    }
