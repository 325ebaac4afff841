#!/usr/bin/python3
"""What snapcraft would do with snap/snapcraft.yaml, as far as this machine can do it.

    snapcraft-prime.py validate SNAPCRAFT_YAML SCHEMA_JSON
        Validates the project against snapcraft's JSON schema (the branch for its `base`, as
        snapcraft's own discriminator picks it). Prints each error with its path; exit 1.

    snapcraft-prime.py prime SNAPCRAFT_YAML PROJECT_ROOT BINARY PRIME_DIR ARCH
        Lays out PRIME_DIR as snapcraft's prime step would for this project: the rust part's
        `cargo install` result (BINARY at bin/outpost), the dump part (organize), the hooks
        from snap/hooks in meta/hooks, and meta/snap.yaml rendered from snapcraft.yaml
        (version from Cargo.toml as the part's override-pull sets it, `platforms` to
        `architectures`, snapcraft-only keys dropped).
"""

import json
import os
import re
import shutil
import sys

import jsonschema
import yaml

# Keys of snapcraft.yaml that snapd's snap.yaml knows (the rest is build information).
SNAP_YAML_KEYS = [
    "name", "version", "summary", "description", "title", "license", "type", "base", "grade",
    "confinement", "architectures", "assumes", "epoch", "apps", "hooks", "plugs", "slots",
    "layout", "environment", "system-usernames", "links",
]
APP_KEYS_DROPPED = {"adapter", "desktop", "extensions", "command-chain-extra"}


def validate(project_path, schema_path):
    with open(schema_path) as f:
        schema = json.load(f)
    with open(project_path) as f:
        project = yaml.safe_load(f)
    base = project.get("base")
    defs = {"core22": "Core22Project", "core24": "Core24Project", "core26": "Core26Project"}
    if base not in defs:
        print(f"base: {base!r} is not one this check knows")
        return 1
    branch = {"$ref": f"#/$defs/{defs[base]}", "$defs": schema["$defs"]}
    errors = list(jsonschema.Draft202012Validator(branch).iter_errors(project))
    for e in errors:
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        print(f"{where}: {e.message}")
        for c in e.context or []:
            print(f"    {'.'.join(str(p) for p in c.absolute_path)}: {c.message}")
    return 1 if errors else 0


def cargo_version(root):
    with open(os.path.join(root, "Cargo.toml")) as f:
        for line in f:
            m = re.match(r'^version\s*=\s*"([^"]+)"', line)
            if m:
                return m.group(1)
    raise SystemExit("no version in Cargo.toml")


def prime(project_path, root, binary, prime_dir, arch):
    with open(project_path) as f:
        project = yaml.safe_load(f)
    if os.path.exists(prime_dir):
        shutil.rmtree(prime_dir)
    os.makedirs(os.path.join(prime_dir, "bin"))
    # parts: the rust part installs the crate's binary into bin/; dump parts copy + organize.
    for name, part in project["parts"].items():
        plugin = part.get("plugin")
        if plugin == "rust":
            shutil.copy2(binary, os.path.join(prime_dir, "bin", "outpost"))
        elif plugin == "dump":
            src = os.path.join(root, part.get("source", "."))
            organize = part.get("organize", {})
            for entry in os.listdir(src):
                dest = os.path.join(prime_dir, organize.get(entry, entry))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.join(src, entry), dest)
        else:
            raise SystemExit(f"part {name}: plugin {plugin!r} is not laid out by this script")
    meta = {}
    for key in SNAP_YAML_KEYS:
        if key in project:
            meta[key] = project[key]
    if "adopt-info" in project and "version" not in meta:
        meta["version"] = cargo_version(root)
    if "platforms" in project:
        if arch not in project["platforms"]:
            raise SystemExit(f"platforms has no {arch}")
        meta["architectures"] = [arch]
    for app in meta.get("apps", {}).values():
        for k in APP_KEYS_DROPPED:
            app.pop(k, None)
    hooks_src = os.path.join(root, "snap", "hooks")
    hooks_dst = os.path.join(prime_dir, "meta", "hooks")
    os.makedirs(hooks_dst)
    for h in sorted(os.listdir(hooks_src)):
        shutil.copy2(os.path.join(hooks_src, h), os.path.join(hooks_dst, h))
    # snapcraft lists every hook in snap.yaml, those without plugs as empty entries.
    hooks = meta.get("hooks") or {}
    for h in sorted(os.listdir(hooks_src)):
        hooks.setdefault(h, None)
    meta["hooks"] = hooks
    with open(os.path.join(prime_dir, "meta", "snap.yaml"), "w") as f:
        yaml.safe_dump(meta, f, sort_keys=False, default_flow_style=False, width=1000)
    return 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "validate":
        sys.exit(validate(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 7 and sys.argv[1] == "prime":
        sys.exit(prime(*sys.argv[2:]))
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
