"""Turn one version of a CustomResourceDefinition into a strict JSON schema, for tests/test_deploy.py.

    python deploy/schemas/vendor_crd.py CRD.yaml VERSION [--keep spec.predictor ...] > deploy/schemas/NAME.json

The CRD's `openAPIV3Schema` (an OpenAPI v3 structural schema) becomes a JSON Schema (draft 2020-12)
that rejects what the API server's strict field validation rejects:

- every structural object (one reached through properties / items / additionalProperties) gets
  `additionalProperties: false` unless the CRD says `x-kubernetes-preserve-unknown-fields` or gives
  `additionalProperties` itself; an object without properties is strict too (the server prunes, and
  `kubectl apply` refuses, any field there);
- `nullable: true` admits null; OpenAPI's boolean `exclusiveMinimum`/`exclusiveMaximum` become numbers;
- `apiVersion` and `kind` are pinned to the CRD's group/version and kind, and required.

Dropped, and so not checked: descriptions and examples (size), CEL rules (`x-kubernetes-validations`),
list and map semantics (`x-kubernetes-list-type`, `-list-map-keys`, `-map-type`). `metadata` stays as the
CRD gives it (`type: object`); the test checks it against ObjectMeta. `--keep` prunes the schema to the
listed dotted paths (and everything under them), for CRDs too large to vendor whole; a pruned schema
rejects fields outside those paths, so it is a subset of the CRD, never looser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

_DROPPED = {"description", "example", "externalDocs", "title", "x-kubernetes-validations", "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-embedded-resource"}
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def convert(node: dict, structural: bool = True) -> dict:
    """One OpenAPI v3 schema node as JSON Schema; `structural` is False inside allOf/anyOf/oneOf/not."""
    out: dict = {}
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    for key, value in node.items():
        if key in _DROPPED or key == "x-kubernetes-preserve-unknown-fields":
            continue
        if key == "x-kubernetes-int-or-string":
            # An int-or-string node carries anyOf [integer, string] itself in generated CRDs; make sure of it.
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            continue
        if key == "properties":
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = convert(value)
        elif key == "additionalProperties":
            out[key] = value if isinstance(value, bool) else convert(value)
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [convert(sub, structural=False) for sub in value]
        elif key == "not":
            out[key] = convert(value, structural=False)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            if value is True:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = node[bound]
        elif key == "nullable":
            continue
        elif key.startswith("x-"):
            raise ValueError(f"unhandled extension {key}")
        else:
            out[key] = value
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in out:
            out.pop("minimum" if key == "exclusiveMinimum" else "maximum", None)
    if structural and out.get("type") == "object" and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def prune(schema: dict, keep: list[str]) -> dict:
    """Only the properties on the paths in `keep` (dotted, through properties and array items)."""
    tree: dict = {}
    for path in keep:
        level = tree
        for part in path.split("."):
            level = level.setdefault(part, {})

    def walk(node: dict, sub: dict) -> dict:
        if not sub:
            return node
        if node.get("type") == "array":
            return {**node, "items": walk(node["items"], sub)}
        missing = set(sub) - set(node.get("properties", {}))
        if missing:
            raise KeyError(f"not in the schema: {sorted(missing)}")
        props = {name: walk(node["properties"][name], sub[name]) for name in sub}
        return {**node, "properties": props, "required": [r for r in node.get("required", []) if r in props]}

    return walk(schema, tree)


def crd_schema(crd: dict, version: str, keep: list[str] | None = None, source: str = "") -> dict:
    spec = crd["spec"]
    [entry] = [v for v in spec["versions"] if v["name"] == version]
    openapi = entry["schema"]["openAPIV3Schema"]
    if keep:
        openapi = prune(openapi, ["apiVersion", "kind", "metadata", *keep])
    schema = convert(openapi)
    api_version = f"{spec['group']}/{version}"
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    # ObjectMeta is the API server's, not the CRD's: left open here, checked by the caller.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = ["apiVersion", "kind", "metadata", *[r for r in schema.get("required", [])
                                                              if r not in ("apiVersion", "kind", "metadata")]]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{spec['names']['kind']} {api_version} from {source or 'a CRD'}"
                        + (f", pruned to {', '.join(keep)}" if keep else "")
                        + "; made by deploy/schemas/vendor_crd.py",
            **schema}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition YAML")
    parser.add_argument("version", help="the served version, e.g. v1")
    parser.add_argument("--keep", nargs="*", default=None, help="dotted paths to keep (default: everything)")
    parser.add_argument("--source", default="", help="where the CRD came from, recorded in $comment")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    json.dump(crd_schema(crd, args.version, args.keep, args.source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
