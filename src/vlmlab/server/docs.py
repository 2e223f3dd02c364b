"""``/docs``: the API reference as one self-contained page, made from the server's OpenAPI schema.

FastAPI's own ``/docs`` loads Swagger UI from a CDN and is a blank page on a machine without
internet access; this one has no scripts and no external assets (``vlmlab.htmlpage``), so it reads
the same offline. The full schema stays at ``/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from vlmlab.htmlpage import Raw, escape, page, table


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/components/schemas/Name``)."""
    ref = node.get("$ref")
    if not ref:
        return node
    found: Any = schema
    for part in ref.lstrip("#/").split("/"):
        found = found.get(part, {})
    return found


def type_text(schema: dict[str, Any], node: dict[str, Any]) -> str:
    """A short type description: ``integer``, ``string | null``, ``array of ChatMessage``, ..."""
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in node or "oneOf" in node:
        return " | ".join(type_text(schema, n) for n in node.get("anyOf", node.get("oneOf", [])))
    kind = node.get("type", "any")
    if isinstance(kind, list):
        return " | ".join(kind)
    if kind == "array":
        return f"array of {type_text(schema, node.get('items', {}))}"
    if "enum" in node:
        return " | ".join(repr(v) for v in node["enum"])
    if "const" in node:
        return repr(node["const"])
    return kind


def bounds_text(node: dict[str, Any]) -> str:
    parts = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in node:
            value = node[key]
            parts.append(f"{sign} {int(value) if float(value).is_integer() else value:,}")
    for option in node.get("anyOf", []):
        parts += [p for p in bounds_text(option).split(", ") if p and p not in parts]
    return ", ".join(parts)


def fields_table(schema: dict[str, Any], model: dict[str, Any]) -> str:
    required = set(model.get("required", []))
    rows = []
    for name, node in model.get("properties", {}).items():
        default = json.dumps(node["default"]) if "default" in node else ""
        rows.append((name, type_text(schema, node), "yes" if name in required else "", bounds_text(node), default))
    return table(("field", "type", "required", "range", "default"), rows)


def docs_page(schema: dict[str, Any]) -> str:
    """The whole reference: each route with its request fields and its answers."""
    sections = [
        "<p>Every route of this server, from its OpenAPI schema "
        '(<a href="/openapi.json">/openapi.json</a>). Errors are OpenAI\'s object: '
        "<code>{\"error\": {\"message\", \"type\", \"param\", \"code\"}}</code>.</p>"
    ]
    nested: dict[str, dict[str, Any]] = {}
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            sections.append(f"<h2>{escape(method.upper())} {escape(path)}</h2>")
            if operation.get("description") or operation.get("summary"):
                sections.append(f"<p>{escape(operation.get('description') or operation.get('summary'))}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                model = resolve(schema, body.get("schema", {}))
                sections.append(f"<p>Request body: <code>{escape(type_text(schema, body.get('schema', {})))}</code></p>")
                sections.append(fields_table(schema, model))
                for node in model.get("properties", {}).values():
                    for ref in _refs(node):
                        nested.setdefault(ref, resolve(schema, {"$ref": f"#/components/schemas/{ref}"}))
            answers = [
                (status, answer.get("description", ""), Raw("<br>".join(f"<code>{escape(c)}</code>" for c in answer.get("content", {}))))
                for status, answer in operation.get("responses", {}).items()
            ]  # fmt: skip
            sections.append(table(("status", "meaning", "content type"), answers))
    for name, model in sorted(nested.items()):
        if model.get("properties"):
            sections.append(f"<h2>{escape(name)}</h2>")
            sections.append(fields_table(schema, model))
    return page(f"{schema.get('info', {}).get('title', 'API')} API", sections)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []
