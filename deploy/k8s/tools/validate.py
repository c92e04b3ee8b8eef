"""Validates rendered Kubernetes manifests offline.

Every object of a core API group is checked against the JSON schemas that
kubernetes-validate bundles for one pinned Kubernetes version, in strict
mode (an unknown field is an error). Objects of the operators' custom
resources (Prometheus Operator, CloudNativePG, KEDA) have no bundled schema:
they are listed as skipped, after a shape check (known kind of the group,
a name, a spec). An object of any other group or kind fails, so a typo in
a kind cannot pass as a custom resource.

Two rules of ptune's own are checked too: every container image names a tag
or digest other than latest, and a pod whose worker drains on SIGTERM
(PTUNE_DRAIN_TIMEOUT) has a terminationGracePeriodSeconds at least 10 s
longer, so the kubelet does not kill it before its jobs are handed back.

Usage: validate.py --kubernetes-version 1.32.0 FILE...
Prints one line per object and a summary line per file:
  summary FILE objects=N validated=V skipped=S failed=F skipped_kinds=K,...
Exits 1 when any object failed.
"""

import argparse
import sys

import yaml
from kubernetes_validate import utils

CUSTOM_RESOURCES = {
    "monitoring.coreos.com": {"PodMonitor", "ServiceMonitor", "PrometheusRule"},
    "postgresql.cnpg.io": {"Cluster", "Pooler", "ScheduledBackup"},
    "keda.sh": {"ScaledObject", "ScaledJob", "TriggerAuthentication"},
}
DRAIN_MARGIN_SECONDS = 10


def pod_spec(obj):
    spec = obj.get("spec") or {}
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return (spec.get("template") or {}).get("spec") or {}
    if obj["kind"] == "Pod":
        return spec
    return None


def ptune_rules(obj):
    """Errors of the rules above, as strings."""
    errors = []
    spec = pod_spec(obj)
    if spec is None:
        return errors
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    for c in containers:
        image = c.get("image", "")
        name = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in name or name.endswith(":latest")):
            errors.append(f"container {c.get('name')}: image {image!r} needs a tag or digest other than latest")
        for env in c.get("env") or []:
            if env.get("name") == "PTUNE_DRAIN_TIMEOUT" and "value" in env:
                drain = int(env["value"])
                grace = int(spec.get("terminationGracePeriodSeconds", 30))
                if grace < drain + DRAIN_MARGIN_SECONDS:
                    errors.append(
                        f"container {c.get('name')}: terminationGracePeriodSeconds {grace} must be at least "
                        f"PTUNE_DRAIN_TIMEOUT {drain} + {DRAIN_MARGIN_SECONDS}"
                    )
    return errors


def check(obj, version):
    """Returns ('validated' | 'skipped' | 'failed', message)."""
    api_version = obj.get("apiVersion", "")
    kind = obj.get("kind", "")
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    errors = ptune_rules(obj) if kind else []
    if group in CUSTOM_RESOURCES:
        if kind not in CUSTOM_RESOURCES[group]:
            return "failed", f"{api_version} has no kind {kind!r} this check knows"
        if not (obj.get("metadata") or {}).get("name") or not isinstance(obj.get("spec"), dict):
            return "failed", "a custom resource needs metadata.name and a spec"
        return "skipped", f"custom resource {api_version}, no bundled schema"
    try:
        utils.validate(obj, version, strict=True)
    except utils.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return "failed", f"{path}: {e.message}"
    except utils.SchemaNotFoundError as e:
        return "failed", e.message
    if errors:
        return "failed", "; ".join(errors)
    return "validated", f"Kubernetes {utils.major_minor(version)} schema, strict"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    any_failed = False
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        counts = {"validated": 0, "skipped": 0, "failed": 0}
        skipped_kinds = set()
        for obj in objects:
            outcome, message = check(obj, args.kubernetes_version)
            counts[outcome] += 1
            if outcome == "skipped":
                skipped_kinds.add(obj["kind"])
            name = (obj.get("metadata") or {}).get("name", "?")
            print(f"  {outcome:<9} {obj.get('kind', '?')}/{name}: {message}")
        any_failed |= counts["failed"] > 0
        print(
            f"summary {path} objects={len(objects)} validated={counts['validated']} "
            f"skipped={counts['skipped']} failed={counts['failed']} "
            f"skipped_kinds={','.join(sorted(skipped_kinds)) or '-'}"
        )
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
