"""Offline validation of kvmesh's Kubernetes and Istio manifests (see
scripts/validate-manifests)."""

import argparse
import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_crd_schemas(path):
    """(group, version, kind) -> (openAPIV3Schema, namespaced)."""
    schemas = {}
    with open(path, encoding="utf-8") as f:
        for crd in yaml.safe_load_all(f):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    key = (spec["group"], version["name"], spec["names"]["kind"])
                    schemas[key] = (schema, spec.get("scope") == "Namespaced")
    # Istio 1.22 served its v1beta1 APIs as v1 with the schema unchanged;
    # CRDs older than that (scripts/setup's) have v1beta1 only.
    for group, version, kind in list(schemas):
        if version == "v1beta1":
            schemas.setdefault((group, "v1", kind), schemas[(group, version, kind)])
    return schemas


def strict(schema):
    """Unknown fields become errors, as with kubectl's strict field
    validation, except where the schema preserves them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def validate_istio(doc, schemas):
    group, _, version = doc["apiVersion"].partition("/")
    key = (group, version, doc["kind"])
    if key not in schemas:
        return [f"no CRD schema for {doc['apiVersion']} {doc['kind']}"]
    schema, namespaced = schemas[key]
    problems = []
    if namespaced and not doc.get("metadata", {}).get("namespace"):
        problems.append("metadata.namespace: required (say where it applies)")
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    root = {k: v for k, v in schema.items() if k != "properties"}
    root["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(strict(root))
    for error in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{where}: {error.message}")
    return problems


def validate_kubernetes(doc, kubernetes_version):
    problems = []
    if doc["kind"] not in ("Namespace",) and not doc.get("metadata", {}).get("namespace"):
        problems.append("metadata.namespace: required (say where it applies)")
    try:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{where}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        problems.append(f"no Kubernetes {kubernetes_version} schema: {error}")
    return problems


def check_kustomization(path):
    with open(path, encoding="utf-8") as f:
        kustomization = yaml.safe_load(f) or {}
    problems = []
    for resource in kustomization.get("resources", []):
        target = path.parent / resource
        if target.is_dir():
            if not (target / "kustomization.yaml").is_file():
                problems.append(f"resources: {resource}/ has no kustomization.yaml")
        elif not target.is_file():
            problems.append(f"resources: {resource} does not exist")
    for generator in kustomization.get("configMapGenerator", []):
        for source in generator.get("files", []):
            name = source.split("=", 1)[-1]
            if not (path.parent / name).is_file():
                problems.append(f"configMapGenerator: {name} does not exist")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", nargs="?", default=str(ROOT / "istio"))
    parser.add_argument("--crds", default=str(ROOT / ".data/istio-crds/crd-all.gen.yaml"))
    parser.add_argument("--kubernetes-version", default="1.33.0")
    args = parser.parse_args()

    if not pathlib.Path(args.crds).is_file():
        print(f"Istio CRD schemas not found at {args.crds} (run scripts/setup, or pass --crds FILE)", file=sys.stderr)
        return 2
    schemas = load_crd_schemas(args.crds)
    directory = pathlib.Path(args.directory)
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml"))
    problems = []
    documents = 0
    for path in files:
        relative = path.relative_to(directory)
        if path.name == "kustomization.yaml":
            problems += [f"{relative}: {p}" for p in check_kustomization(path)]
            continue
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as error:
            problems.append(f"{relative}: not YAML: {error}")
            continue
        for index, doc in enumerate(docs):
            documents += 1
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                problems.append(f"{relative}[{index}]: not a Kubernetes object (apiVersion and kind)")
                continue
            name = f"{doc['kind']} {doc.get('metadata', {}).get('namespace', '-')}/{doc.get('metadata', {}).get('name', '?')}"
            if doc["apiVersion"].split("/")[0].endswith("istio.io"):
                found = validate_istio(doc, schemas)
            else:
                found = validate_kubernetes(doc, args.kubernetes_version)
            problems += [f"{relative}[{index}] {name}: {p}" for p in found]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {directory}", file=sys.stderr)
        return 1
    print(f"{documents} manifests in {len(files)} files valid ({directory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
