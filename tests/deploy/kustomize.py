#!/usr/bin/env python3
"""A small kustomize renderer for deploy/k8s, for machines without a kustomize binary.

    python3 tests/deploy/kustomize.py DIR > rendered.yaml

It implements the subset of kustomize that deploy/k8s uses, and refuses anything else (so it never renders
something different from kustomize without saying so):
  - resources: YAML files (multi-document) and directories holding a kustomization.yaml (recursively);
  - configMapGenerator: name, files (KEY=PATH or PATH), literals, behavior create|replace|merge; only with
    generatorOptions.disableNameSuffixHash: true (no hash suffix, so no name references to rewrite);
  - patches: strategic merge patches from `path` or inline `patch`, applied to the resource with the
    patch's kind and name (or the `target`'s kind and name); lists merge by their Kubernetes merge key
    (containers/initContainers/env/volumes/imagePullSecrets by name, volumeMounts by mountPath, container
    ports by containerPort, Service ports by port), `$patch: delete` removes a list item, null removes a key;
  - images: name, newName, newTag, digest on containers and initContainers.
tests/deploy/check.sh compares its output with `kubectl kustomize` where that exists.
"""

import copy
import os
import sys

import yaml

KNOWN_KEYS = {
    "apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches", "images",
}
# Kubernetes' patchMergeKey for the lists deploy/k8s patches (others are replaced whole, as kustomize does
# for lists without a merge key).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class Unsupported(Exception):
    pass


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key_of(res):
    return (res.get("kind"), res.get("metadata", {}).get("name"))


def merge_key(field, items):
    if field in MERGE_KEYS:
        return MERGE_KEYS[field]
    if field == "ports" and items:
        # Container ports merge by containerPort, Service ports by port.
        return "containerPort" if "containerPort" in items[0] else "port"
    return None


def strategic_merge(base, patch, field=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise Unsupported(f"directive {k} in a patch")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = strip_directives(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        mk = merge_key(field, base + patch)
        if mk is None or not all(isinstance(x, dict) for x in base + patch):
            return strip_directives(patch)
        # Order as Kubernetes' strategic merge orders it: the patch's items in patch order, then each item
        # only in the original inserted before the first following item that came later in the original.
        index = {x.get(mk): i for i, x in enumerate(base)}
        merged, in_patch = [], set()
        for item in patch:
            if mk not in item:
                raise Unsupported(f"list item without merge key {mk} in {field}")
            in_patch.add(item[mk])
            i = index.get(item[mk])
            if item.get("$patch") == "delete":
                continue
            value = strip_directives(item) if i is None else strategic_merge(base[i], item, None)
            merged.append((value, i))
        pos = 0
        for i, x in enumerate(base):
            if x.get(mk) in in_patch:
                continue
            j = pos
            while j < len(merged) and not (merged[j][1] is not None and merged[j][1] > i):
                j += 1
            merged.insert(j, (x, i))
            pos = j + 1
        return [v for v, _ in merged]
    return strip_directives(patch)


def strip_directives(v):
    if isinstance(v, dict):
        if any(k.startswith("$") for k in v):
            raise Unsupported(f"directive in a new element: {v}")
        return {k: strip_directives(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [strip_directives(x) for x in v]
    return v


def generate_configmap(root, gen, disable_hash):
    if not disable_hash:
        raise Unsupported("configMapGenerator without generatorOptions.disableNameSuffixHash: true")
    extra = set(gen) - {"name", "files", "literals", "behavior"}
    if extra:
        raise Unsupported(f"configMapGenerator keys {sorted(extra)}")
    data = {}
    for spec in gen.get("files", []):
        key, _, rel = spec.partition("=") if "=" in spec else (os.path.basename(spec), "", spec)
        with open(os.path.join(root, rel)) as f:
            data[key] = f.read()
    for lit in gen.get("literals", []):
        k, _, v = lit.partition("=")
        data[k] = v
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}


def set_image(container, images):
    name = container.get("image", "")
    # image = NAME[:TAG][@DIGEST]; kustomize matches on NAME.
    repo = name.split("@")[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo[: repo.rfind(":")]
    for img in images:
        if img["name"] != repo:
            continue
        extra = set(img) - {"name", "newName", "newTag", "digest"}
        if extra:
            raise Unsupported(f"images keys {sorted(extra)}")
        new = img.get("newName", repo)
        if "digest" in img:
            container["image"] = f"{new}@{img['digest']}"
        elif "newTag" in img:
            container["image"] = f"{new}:{img['newTag']}"
        else:
            tail = name[len(repo):]
            container["image"] = new + tail


def render(root):
    kfile = next((os.path.join(root, n) for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if os.path.exists(os.path.join(root, n))), None)
    if kfile is None:
        raise Unsupported(f"{root}: no kustomization.yaml")
    with open(kfile) as f:
        k = yaml.safe_load(f) or {}
    extra = set(k) - KNOWN_KEYS
    if extra:
        raise Unsupported(f"{kfile}: keys {sorted(extra)}")

    resources = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(root, r))
        resources.extend(render(p) if os.path.isdir(p) else load_docs(p))

    disable_hash = bool((k.get("generatorOptions") or {}).get("disableNameSuffixHash"))
    for gen in k.get("configMapGenerator", []):
        cm = generate_configmap(root, gen, disable_hash)
        behavior = gen.get("behavior", "create")
        idx = next((i for i, x in enumerate(resources) if key_of(x) == key_of(cm)), None)
        if behavior == "create":
            if idx is not None:
                raise Unsupported(f"configMapGenerator {gen['name']}: already exists (use behavior)")
            resources.append(cm)
        elif idx is None:
            raise Unsupported(f"configMapGenerator {gen['name']}: behavior {behavior} but no such ConfigMap")
        elif behavior == "replace":
            resources[idx] = cm
        elif behavior == "merge":
            resources[idx]["data"] = {**resources[idx].get("data", {}), **cm["data"]}
        else:
            raise Unsupported(f"configMapGenerator behavior {behavior}")

    for p in k.get("patches", []):
        extra = set(p) - {"path", "patch", "target"}
        if extra:
            raise Unsupported(f"patch keys {sorted(extra)}")
        if "path" in p:
            docs = load_docs(os.path.join(root, p["path"]))
        else:
            docs = [d for d in yaml.safe_load_all(p["patch"]) if d is not None]
        if len(docs) != 1 or not isinstance(docs[0], dict):
            raise Unsupported(f"patch {p}: one strategic-merge document expected (JSON 6902 is not supported)")
        doc = docs[0]
        target = p.get("target") or {}
        if set(target) - {"kind", "name"}:
            raise Unsupported(f"patch target keys {sorted(target)}")
        want = (target.get("kind", doc.get("kind")), target.get("name", doc.get("metadata", {}).get("name")))
        idx = next((i for i, x in enumerate(resources) if key_of(x) == want), None)
        if idx is None:
            raise Unsupported(f"patch {p.get('path', '')}: no resource {want}")
        body = {kk: v for kk, v in doc.items() if kk not in ("apiVersion", "kind")}
        body["metadata"] = {kk: v for kk, v in body.get("metadata", {}).items() if kk != "name"}
        if not body["metadata"]:
            del body["metadata"]
        resources[idx] = strategic_merge(resources[idx], body)

    images = k.get("images", [])
    if images:
        for r in resources:
            spec = r.get("spec", {})
            pod = spec.get("template", {}).get("spec", spec if r.get("kind") == "Pod" else {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                set_image(c, images)
    return copy.deepcopy(resources)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        docs = render(sys.argv[1])
    except Unsupported as e:
        sys.exit(f"kustomize.py: unsupported: {e}")
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=True, default_flow_style=False)


if __name__ == "__main__":
    main()
