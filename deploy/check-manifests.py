#!/usr/bin/env python3
"""Validates deploy/: the Kubernetes manifests against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors) and against each other, and every
LADLE_ variable the manifests and the Compose file set against the ones ladle knows.

    python deploy/check-manifests.py [--ladle target/debug/ladle]

Run by .ci/run in a virtualenv holding kubernetes-validate (PyPI; offline, it ships the
schemas). Needs no `kubectl`: the Kustomize rendering is done here for the two fields our
kustomizations use (`resources`: files and folders, `images`: name, newName, newTag); any
other field is an error (render with `kubectl kustomize` then). When a `kubectl` is on PATH,
its rendering must equal ours. What is checked:
- the kustomizations of deploy/k8s and deploy/k8s-monitoring render, and every rendered
  object is valid for Kubernetes 1.30 and 1.37, strictly; only the ServiceMonitor (a
  Prometheus Operator CRD, whose schema is not part of Kubernetes) has no schema, and it is
  checked below instead;
- every Service, PodDisruptionBudget and ServiceMonitor selects pods that exist, and every
  port they name (targetPort, ServiceMonitor endpoint port, prometheus.io/port annotation) is
  a container port of those pods; probes name declared ports;
- the workers' terminationGracePeriodSeconds exceeds LADLE_SHUTDOWN_GRACE_SECS;
- with --ladle, every LADLE_ name in the manifests and deploy/compose.yaml is one that
  `ladle serve --help` lists (an unknown LADLE_ variable is a start-up error).
"""

import argparse
import pathlib
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
VERSIONS = ["1.30.0", "1.37.0"]
NO_SCHEMA_KINDS = {"ServiceMonitor"}
errors = []


def fail(msg):
    errors.append(msg)
    print(f"FAIL {msg}")


KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "images"}


def set_images(objs, images):
    """Kustomize's `images` transformer: a container image named `name` (with or without a
    tag) gets `newName` and/or `newTag`."""
    for o in objs:
        spec = o.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get(
            "spec", {}
        ).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            ref = c.get("image", "")
            base, _, tag = ref.partition(":")
            for img in images:
                if base == img["name"]:
                    c["image"] = img.get("newName", base) + (
                        ":" + img["newTag"] if "newTag" in img else (":" + tag if tag else "")
                    )


def render_here(path):
    """The objects `kubectl kustomize path` gives, for the fields in KUSTOMIZE_FIELDS."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZE_FIELDS
    if unknown:
        raise SystemExit(
            f"{path}/kustomization.yaml: {sorted(unknown)} not rendered by check-manifests.py; "
            "teach render_here() or render with kubectl kustomize"
        )
    objs = []
    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            objs += render_here(target)
        else:
            objs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    set_images(objs, kust.get("images", []))
    return objs


def render(path):
    objs = render_here(path)
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True
        ).stdout
        theirs = [d for d in yaml.safe_load_all(out) if d]
        key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
        if sorted(objs, key=key) != sorted(theirs, key=key):
            fail(f"{path}: kubectl kustomize renders other objects than check-manifests.py")
    return objs


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pods(objs):
    """(labels, pod spec) of every workload's pod template."""
    for o in objs:
        tmpl = o.get("spec", {}).get("template")
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet") and tmpl:
            yield o, tmpl["metadata"].get("labels", {}), tmpl


def selected(objs, selector):
    return [(o, t) for o, labels, t in pods(objs) if selector.items() <= labels.items()]


def container_ports(tmpl):
    ports = {}
    for c in tmpl["spec"]["containers"]:
        for p in c.get("ports", []):
            ports[p.get("name", str(p["containerPort"]))] = p["containerPort"]
    return ports


def check_schemas(objs):
    for o in objs:
        for v in VERSIONS:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if o["kind"] not in NO_SCHEMA_KINDS:
                    fail(f"{name(o)}: no Kubernetes {v} schema for {o['apiVersion']}")
            except kubernetes_validate.ValidationError as e:
                fail(f"{name(o)} (Kubernetes {v}): {e.message} at {list(e.path)}")


def check_references(objs):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    for svc in by_kind.get("Service", []):
        targets = selected(objs, svc["spec"]["selector"])
        if not targets:
            fail(f"{name(svc)} selects no pods")
        for p in svc["spec"]["ports"]:
            for o, t in targets:
                tp = p.get("targetPort", p["port"])
                ports = container_ports(t)
                if tp not in ports and tp not in ports.values():
                    fail(f"{name(svc)} port {p['name']}: {name(o)} has no port {tp}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not selected(objs, pdb["spec"]["selector"]["matchLabels"]):
            fail(f"{name(pdb)} selects no pods")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        services = [
            s for s in by_kind.get("Service", []) if sel.items() <= s["metadata"]["labels"].items()
        ]
        names = {p["name"] for s in services for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep["port"] not in names:
                fail(f"{name(sm)}: endpoint port {ep['port']} is on none of its Services")
    for o, _, t in pods(objs):
        ports = container_ports(t)
        ann = t["metadata"].get("annotations", {})
        if "prometheus.io/port" in ann and int(ann["prometheus.io/port"]) not in ports.values():
            fail(f"{name(o)}: prometheus.io/port {ann['prometheus.io/port']} is not a container port")
        for c in t["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports and port not in ports.values():
                    fail(f"{name(o)}: {probe} names port {port}, not declared")


def check_grace(objs):
    config = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ladle-config")
    grace = int(config["data"].get("LADLE_SHUTDOWN_GRACE_SECS", "30"))
    for o, labels, t in pods(objs):
        if labels.get("app.kubernetes.io/component") == "worker":
            period = t["spec"].get("terminationGracePeriodSeconds", 30)
            if period <= grace:
                fail(f"{name(o)}: terminationGracePeriodSeconds {period} <= LADLE_SHUTDOWN_GRACE_SECS {grace}")


def check_env_names(ladle):
    help_text = subprocess.run(
        [ladle, "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    known = set(re.findall(r"LADLE_[A-Z0-9_]+", help_text))
    if not known:
        fail(f"`{ladle} serve --help` lists no LADLE_ variables")
        return
    files = sorted((DEPLOY / "k8s").glob("*.yaml")) + [DEPLOY / "compose.yaml"]
    for f in files:
        # Settings, not comments (which may name variables that must NOT be set).
        text = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in f.read_text().splitlines())
        for var in sorted(set(re.findall(r"\bLADLE_[A-Z0-9_]+", text))):
            if var not in known:
                fail(f"{f.relative_to(DEPLOY.parent)}: {var} is not a ladle setting")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ladle", help="a ladle binary whose `serve --help` lists the settings")
    args = ap.parse_args()
    for kust in ("k8s", "k8s-monitoring"):
        objs = render(DEPLOY / kust)
        print(f"deploy/{kust}: {len(objs)} objects: {', '.join(name(o) for o in objs)}")
        check_schemas(objs)
        check_references(objs)
        check_grace(objs)
    if args.ladle:
        check_env_names(args.ladle)
    if errors:
        print(f"{len(errors)} problem(s) in deploy/")
        sys.exit(1)
    print(f"deploy/: valid for Kubernetes {', '.join(VERSIONS)} (strict) and consistent")


if __name__ == "__main__":
    main()
