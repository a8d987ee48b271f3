#!/usr/bin/env python3
"""Checks the Kubernetes manifests under deploy/kubernetes/.

Every document is validated against the Kubernetes JSON schemas shipped by
kubernetes-validate (PyPI), strictly (an unknown field is an error), for the
newest Kubernetes version it knows and for an older one still in wide use.
A kind without a schema (a CRD) is an error too: nothing is skipped.

Then the rules the issue that wrote these files asked for:
- every pod: enableServiceLinks: false, seccomp RuntimeDefault;
- every container: runAsNonRoot, no privilege escalation, capabilities drop
  ALL, a read-only root filesystem (except where WRITABLE_ROOT says why not);
- every Secret and ConfigMap a pod refers to is defined in the same file,
  except the TLS Secrets in EXTERNAL, which the file says how to create;
- the gateway's config is mounted as a directory (no subPath: a subPath mount
  never sees a ConfigMap update) and named by --config;
- the admin port is named `admin` and announced for Prometheus;
- Grafana has [auth.proxy] on, with the gateway's loopback whitelisted, and
  the gateway beside it sends identities that way (identity.grafana =
  "auth_proxy" in its config).

With --configs-out DIR, each ConfigMap's gateway.toml is written there
(FILE-STEM.NAME.toml) for the Rust test to load with the gateway's own
config code.

Usage: check-manifests.py [--configs-out DIR] FILE.yaml...
Exit status: 0 all good, 1 a check failed, 3 kubernetes-validate missing.
"""

import argparse
import os
import sys
import tomllib

try:
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - the message is the point
    print(
        f"check-manifests: kubernetes-validate is not installed ({e}); "
        "install it with `python3 -m pip install kubernetes-validate` (.ci/run does)",
        file=sys.stderr,
    )
    sys.exit(3)

# The newest version the installed schemas know, and an older one.
VERSIONS = [kubernetes_validate.latest_version(), "1.29"]

# Secrets the operator creates (the manifest's comments say how).
EXTERNAL = {"grafana-tls", "pmm-tls"}

# Containers that cannot run with a read-only root filesystem, and why.
WRITABLE_ROOT = {
    "pmm-server": "PMM Server's supervisord, nginx and databases write all over its image",
}

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_spec(doc):
    if doc.get("kind") in WORKLOADS:
        return doc["spec"]["template"]
    if doc.get("kind") == "Pod":
        return doc
    return None


def check_pod(where, template, defined, errors):
    """`defined`: (kind, name) -> the document, for what this file defines."""
    spec = template["spec"]
    metadata = template.get("metadata", {})
    if spec.get("enableServiceLinks") is not False:
        errors.append(f"{where}: enableServiceLinks: false is missing")
    pod_sc = spec.get("securityContext", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def refer(kind, name, what):
        if name in EXTERNAL:
            return
        if (kind, name) not in defined:
            errors.append(f"{where}: {what} refers to {kind} {name}, which this file does not define")

    for v in volumes.values():
        if "secret" in v:
            refer("Secret", v["secret"]["secretName"], f"volume {v['name']}")
        if "configMap" in v:
            refer("ConfigMap", v["configMap"]["name"], f"volume {v['name']}")

    gateway_config = None
    grafana_with_auth_proxy = False
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("runAsNonRoot") is not True:
            errors.append(f"{cw}: securityContext.runAsNonRoot: true is missing")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cw}: securityContext.allowPrivilegeEscalation: false is missing")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append(f"{cw}: securityContext.capabilities.drop: [ALL] is missing")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            errors.append(f"{cw}: seccompProfile RuntimeDefault is missing")
        if sc.get("readOnlyRootFilesystem") is not True and c["name"] not in WRITABLE_ROOT:
            errors.append(f"{cw}: securityContext.readOnlyRootFilesystem: true is missing")
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            if "secretKeyRef" in source:
                refer("Secret", source["secretKeyRef"]["name"], f"env {env['name']}")
            if "configMapKeyRef" in source:
                refer("ConfigMap", source["configMapKeyRef"]["name"], f"env {env['name']}")
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                refer("Secret", source["secretRef"]["name"], "envFrom")
            if "configMapRef" in source:
                refer("ConfigMap", source["configMapRef"]["name"], "envFrom")

        image = c.get("image", "")
        if image.split("/")[-1].startswith("portcullis"):
            gateway_config = check_gateway(cw, c, volumes, metadata, defined, errors)
        if image.startswith("grafana/grafana"):
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            if env.get("GF_AUTH_PROXY_ENABLED") != "true":
                errors.append(f"{cw}: GF_AUTH_PROXY_ENABLED=true ([auth.proxy]) is missing")
            if "127.0.0.1" not in env.get("GF_AUTH_PROXY_WHITELIST", ""):
                errors.append(f"{cw}: GF_AUTH_PROXY_WHITELIST does not whitelist the gateway's 127.0.0.1")
            grafana_with_auth_proxy = True
    if grafana_with_auth_proxy and gateway_config is not None:
        mode = gateway_config.get("identity", {}).get("grafana")
        if mode != "auth_proxy":
            errors.append(
                f'{where}: Grafana has [auth.proxy] but the gateway\'s identity.grafana is {mode!r}, '
                'not "auth_proxy": the identity headers would never be sent'
            )


def check_gateway(cw, c, volumes, metadata, defined, errors):
    """Returns the gateway's config (parsed) when this file defines it."""
    config = None
    mounts = c.get("volumeMounts", [])
    for m in mounts:
        if "subPath" in m or "subPathExpr" in m:
            errors.append(f"{cw}: {m['mountPath']} is a subPath mount, which never sees an update")
    args = c.get("args", [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        errors.append(f"{cw}: no --config FILE in args")
    else:
        path = args[args.index("--config") + 1]
        directory, name = os.path.split(path)
        mount = next((m for m in mounts if m["mountPath"].rstrip("/") == directory), None)
        volume = volumes.get(mount["name"]) if mount else None
        if not volume or "configMap" not in volume:
            errors.append(f"{cw}: --config {path} is not in a directory mounted from a ConfigMap")
        else:
            config_map = defined.get(("ConfigMap", volume["configMap"]["name"]), {})
            text = config_map.get("data", {}).get(name)
            if text is None:
                errors.append(f"{cw}: --config {path}: the ConfigMap has no key {name}")
            else:
                try:
                    config = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    errors.append(f"{cw}: {name} is not TOML: {e}")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if "admin" not in ports:
        errors.append(f"{cw}: no port named admin (the admin listener, /metrics)")
    annotations = metadata.get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get(
        "prometheus.io/port"
    ) != str(ports.get("admin")):
        errors.append(f"{cw}: the pod does not announce the admin port to Prometheus")
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs-out")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    errors = []
    resources = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            errors.append(f"{path}: no resource")
        defined = {(d.get("kind"), d.get("metadata", {}).get("name")): d for d in docs}
        for doc in docs:
            where = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            resources += 1
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(f"{where}: no schema for Kubernetes {version}: {e.message}")
                except kubernetes_validate.ValidationError as e:
                    location = "/".join(str(p) for p in e.path)
                    errors.append(f"{where}: invalid for Kubernetes {version} at {location}: {e.message}")
            template = pod_spec(doc)
            if template is not None:
                check_pod(where, template, defined, errors)
            if doc.get("kind") == "ConfigMap" and args.configs_out:
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".toml"):
                        stem = os.path.splitext(os.path.basename(path))[0]
                        out = os.path.join(
                            args.configs_out, f"{stem}.{doc['metadata']['name']}.{key}"
                        )
                        with open(out, "w") as f:
                            f.write(text)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"check-manifests: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"check-manifests: {resources} resources in {len(args.files)} files valid "
        f"(strict, Kubernetes {' and '.join(VERSIONS)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
