#!/usr/bin/env python3
"""Checks a rendered deploy/k8s flavour beyond the schemas (what a schema cannot know):

    python3 tests/deploy/check_manifests.py RENDERED.yaml [OTHER_RENDERING.yaml] [--gpu]

- with a second file: both renderings hold the same objects (tests/deploy/kustomize.py against kubectl's);
- the number of workers agrees: the worker Job's completions = parallelism = the coordinator's
  DDPO__CLUSTER__WORLD_SIZE (a mismatch leaves the job waiting for a worker that never comes);
- the coordinator is probed with gRPC health probes on its port, runs one replica, is recreated (never two);
- workers restart in place and bind the ring on the pod IP; every pod mounts the data volume claimed by
  the PVC, which is ReadWriteMany;
- --gpu: each worker asks for exactly one GPU and uses cuda:0; otherwise no GPU and device cpu.
Exits non-zero with every problem listed.
"""

import sys

import yaml


def load(path):
    with open(path) as f:
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    gpu = "--gpu" in sys.argv
    docs = load(args[0])
    problems = []

    if len(args) > 1:
        other = load(args[1])
        for k in sorted(set(docs) | set(other)):
            if docs.get(k) != other.get(k):
                problems.append(f"{k[0]}/{k[1]} differs between {args[0]} and {args[1]}")

    coord = docs.get(("Deployment", "ddpo-coordinator"))
    job = docs.get(("Job", "ddpo-worker"))
    pvc = docs.get(("PersistentVolumeClaim", "ddpo-data"))
    if not (coord and job and pvc and ("Service", "ddpo-coordinator") in docs and ("ConfigMap", "ddpo-job") in docs):
        sys.exit(f"{args[0]}: expected the coordinator Deployment and Service, the ddpo-job ConfigMap, "
                 f"the ddpo-worker Job and the ddpo-data PVC; found {sorted(docs)}")

    cspec = coord["spec"]
    c = next(x for x in cspec["template"]["spec"]["containers"] if x["name"] == "coordinator")
    ws = env_of(c).get("DDPO__CLUSTER__WORLD_SIZE", {}).get("value")
    js = job["spec"]
    if not (str(js.get("completions")) == str(js.get("parallelism")) == str(ws)):
        problems.append(f"workers: completions {js.get('completions')}, parallelism {js.get('parallelism')} and "
                        f"the coordinator's DDPO__CLUSTER__WORLD_SIZE {ws} must be equal")
    if js.get("completionMode") != "Indexed":
        problems.append("the worker Job is not Indexed")
    if cspec.get("replicas") != 1 or cspec.get("strategy", {}).get("type") != "Recreate":
        problems.append("the coordinator must be one replica with the Recreate strategy")
    port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"), None)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c.get(probe, {}).get("grpc")
        if not g or g.get("port") != port:
            problems.append(f"coordinator {probe} is not a gRPC probe on the grpc port {port}")
    if f"--listen=0.0.0.0:{port}" not in c.get("args", []):
        problems.append(f"coordinator does not listen on 0.0.0.0:{port}")

    pod = js["template"]["spec"]
    w = next(x for x in pod["containers"] if x["name"] == "worker")
    if pod.get("restartPolicy") != "OnFailure":
        problems.append("workers must restart in place (restartPolicy OnFailure)")
    if "--ring-bind=$(POD_IP):0" not in w.get("args", []) or "POD_IP" not in env_of(w):
        problems.append("workers must bind the ring on the pod IP")
    svc_url = f"--coordinator=http://ddpo-coordinator:{port}"
    if svc_url not in w.get("args", []):
        problems.append(f"workers must reach the coordinator Service ({svc_url})")
    device = env_of(w).get("DDPO_DEVICE", {}).get("value")
    gpus = w.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpu and (gpus != 1 or device != "cuda:0"):
        problems.append(f"GPU flavour: each worker needs nvidia.com/gpu 1 and cuda:0 (has {gpus}, {device})")
    if not gpu and (gpus is not None or device != "cpu"):
        problems.append(f"CPU flavour: workers must ask for no GPU and use cpu (have {gpus}, {device})")

    if "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
        problems.append("the data PVC must be ReadWriteMany (workers on several nodes mount it)")
    for name, spec in (("coordinator", cspec["template"]["spec"]), ("worker", pod)):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]
        if claims != ["ddpo-data"]:
            problems.append(f"{name} pods must mount the ddpo-data claim (have {claims})")

    for p in problems:
        print(f"{args[0]}: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{args[0]}: consistent ({len(docs)} objects, {ws} workers{', 1 GPU each' if gpu else ', CPU'})")


if __name__ == "__main__":
    main()
