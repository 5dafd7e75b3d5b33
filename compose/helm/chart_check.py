"""``make chart-test``, first half: lint, render and validate the Helm chart, offline (no cluster).

For each example values set (``CASES``): ``helm lint --strict``, ``helm template``, then every rendered
object against the Kubernetes JSON schemas of ``KUBE_VERSIONS`` in strict mode (``kubernetes-validate``:
unknown fields are errors), and the KEDA ``ScaledObject`` against KEDA's own CRD schema (vendored in
``schemas/keda/``, checked by sha256) with ``jsonschema``, unknown fields again errors.  Any other kind
(a CRD with no schema here) fails the check rather than pass unvalidated.

    python compose/helm/chart_check.py --helm .tools/helm [--chart DIR]

Prints one line per problem and a summary; exits 1 on any problem.  ``chart_test.py`` (the second
half) checks what the rendered objects mean.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

HELM_DIR = Path(__file__).resolve().parent
CHART = HELM_DIR / "diffserve"
EXAMPLES = HELM_DIR / "examples"
KEDA_CRD = HELM_DIR / "schemas" / "keda" / "keda.sh_scaledobjects.yaml"
KEDA_CRD_SHA256 = "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80"  # v2.20.2
KUBE_VERSIONS = ("1.31", "1.35")
RELEASE, NAMESPACE = "diffserve", "diffserve"
# Each example values set, by name: the files given to helm in this order.
CASES: dict[str, tuple[str, ...]] = {
    "gpu": ("values-gpu.yaml",),
    "cpu": ("values-cpu.yaml",),
    "keda": ("values-gpu.yaml", "values-keda.yaml"),
}


def values_files(case: str) -> list[Path]:
    return [EXAMPLES / name for name in CASES[case]]


def helm_args(files: list[Path], sets: tuple[str, ...] = ()) -> list[str]:
    args = [arg for f in files for arg in ("-f", str(f))]
    return args + [arg for s in sets for arg in ("--set", s)]


def render(
    helm: str, chart: Path, files: list[Path], sets: tuple[str, ...] = (), release: str = RELEASE
) -> list[dict[str, Any]]:
    """``helm template`` of the chart with these values: the objects, in order."""
    out = subprocess.run(
        [helm, "template", release, str(chart), "--namespace", NAMESPACE, *helm_args(files, sets)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"helm template failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def strict_schema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON schema that rejects unknown fields (as ``kubectl apply`` with
    strict field validation does) and accepts what the OpenAPI extensions allow."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def keda_schema() -> dict[str, Any]:
    raw = KEDA_CRD.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != KEDA_CRD_SHA256:
        raise RuntimeError(f"{KEDA_CRD.name}: sha256 {digest}, expected {KEDA_CRD_SHA256} (see its README)")
    crd = yaml.safe_load(raw)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema: dict[str, Any] = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
    return schema


def validate_object(obj: dict[str, Any], keda: dict[str, Any]) -> Iterator[str]:
    """Problems with one rendered object; nothing when it is valid."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") == "ScaledObject" and obj.get("apiVersion") == "keda.sh/v1alpha1":
        for error in jsonschema.Draft7Validator(keda).iter_errors(copy.deepcopy(obj)):
            path = ".".join(str(p) for p in error.absolute_path)
            yield f"{name}: KEDA CRD schema: {path}: {error.message}"
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            yield f"{name}: Kubernetes {version} (strict): {path}: {error.message}"
        except kubernetes_validate.SchemaNotFoundError:
            yield f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version}"


def lint(helm: str, chart: Path, files: list[Path]) -> Iterator[str]:
    out = subprocess.run([helm, "lint", "--strict", str(chart), *helm_args(files)], capture_output=True, text=True)
    if out.returncode != 0:
        problems = [line for line in out.stdout.splitlines() if line.startswith("[")] or [out.stderr.strip()]
        yield from (f"helm lint --strict: {line}" for line in problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--helm", default="helm", help="the helm binary (make chart-test installs one)")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart folder")
    args = parser.parse_args(argv)
    keda = keda_schema()
    problems: list[str] = []
    objects = scaled = 0
    for case in CASES:
        files = values_files(case)
        problems += [f"[{case}] {p}" for p in lint(args.helm, args.chart, files)]
        try:
            rendered = render(args.helm, args.chart, files)
        except RuntimeError as exc:
            problems.append(f"[{case}] {exc}")
            continue
        for obj in rendered:
            objects += 1
            scaled += obj.get("kind") == "ScaledObject"
            problems += [f"[{case}] {p}" for p in validate_object(obj, keda)]
    for problem in problems:
        print(f"chart-check: FAIL {problem}")
    verdict = "FAIL" if problems else "OK"
    print(
        f"chart-check: {verdict}: {len(CASES)} value sets ({', '.join(CASES)}), {objects} objects, "
        f"Kubernetes {' and '.join(KUBE_VERSIONS)} strict, {scaled} ScaledObject(s) against KEDA v2.20.2's CRD"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
