#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels in .whl/ (cp312, manylinux x86_64), for bench/gpu_check.sh.
#
#   bash bench/prepare_gpu_wheels.sh           download (or build) what bench/gpu_wheels.txt lists and .whl/ lacks,
#                                              remove wheels it does not list, then check as below
#   bash bench/prepare_gpu_wheels.sh --check   check only, no network: the list parses; when .whl/ exists it holds
#                                              exactly the listed wheels, each installable on cp312 manylinux x86_64,
#                                              every requirement of each is carried or on the machine (the list's
#                                              "present:" line), and .whl/ with the working tree fits in 64 MiB
#
# Run it on a CPU machine with network (pip); the GPU machine has none. `.whl/` must be ignored by git (it travels
# as a carried path): the script says so when it is not. Exit status 0 when everything checks, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

LIST=bench/gpu_wheels.txt
DEST=.whl
PY=${PYTHON:-python3}
MODE=download
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "usage: bash bench/prepare_gpu_wheels.sh [--check]" >&2; exit 2 ;;
esac
PLATFORMS=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
           manylinux_2_34 manylinux_2_35 manylinux_2_39; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

# The list's entries as "name version build|-" lines; a malformed line is an error naming it.
entries() {
    "$PY" - "$LIST" <<'PY'
import re, sys
path = sys.argv[1]
seen, bad = set(), []
for n, line in enumerate(open(path, encoding="utf-8"), 1):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("present:"):
        continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)(\s+build)?", line)
    key = re.sub(r"[-_.]+", "_", m.group(1)).lower() if m else None
    if not m or key in seen:
        bad.append(f"{path}:{n}: {'duplicate' if m else 'expected NAME==VERSION [build]'}: {line!r}")
        continue
    seen.add(key)
    print(m.group(1), m.group(2), "build" if m.group(3) else "-")
if bad:
    sys.exit("\n".join(bad))
if not seen:
    sys.exit(f"{path}: no wheels listed")
PY
}

# Is there a wheel for NAME==VERSION in $DEST?
have_wheel() {
    local stem
    stem=$(echo "$1" | tr 'A-Z.-' 'a-z__')
    compgen -G "$DEST/${stem}-$2-*.whl" >/dev/null || compgen -G "$DEST/$(echo "$1" | tr '.-' '__')-$2-*.whl" >/dev/null
}

download() {
    local entries_text name version how
    entries_text=$(entries)
    mkdir -p "$DEST"
    while read -r name version how; do
        if have_wheel "$name" "$version"; then
            continue
        fi
        if [[ $how == build ]]; then  # pure-Python sdist: build the wheel here, without compiled ops
            echo "building $name==$version (pure Python, DS_BUILD_OPS=0)"
            DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary "$name" -w "$DEST" \
                "$name==$version"
        else
            echo "downloading $name==$version"
            "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                "${PLATFORMS[@]}" -d "$DEST" "$name==$version"
        fi
    done <<< "$entries_text"
}

# Remove wheels the list does not name (an older version beside a newer one stops the whole install there).
prune() {
    "$PY" - "$DEST" "$(entries)" <<'PY'
import os, re, sys
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
listed = {(norm(n), v) for n, v, _ in (line.split() for line in sys.argv[2].splitlines())}
for f in sorted(os.listdir(sys.argv[1])):
    parts = f.split("-")
    if f.endswith(".whl") and (norm(parts[0]), parts[1]) not in listed:
        os.remove(os.path.join(sys.argv[1], f))
        print(f"removed {f}: not in bench/gpu_wheels.txt")
PY
}

check() {
    local tree_bytes=0 ignored=yes
    entries >/dev/null
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # What travels besides the carried paths: tracked and untracked-not-ignored files.
        # (a tracked file deleted but not yet committed has no size: `|| true`, not a failed check)
        tree_bytes=$({ git ls-files -z -c -o --exclude-standard -- . ":(exclude)$DEST" \
                       | xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
        git check-ignore -q "$DEST/" || ignored=no
    fi
    "$PY" - "$LIST" "$DEST" "$tree_bytes" "$ignored" <<'PY'
import os, re, sys, zipfile

path, dest, tree_bytes, ignored = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "yes"
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
entries, present = {}, set()
for line in open(path, encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line.startswith("present:"):
        present |= {norm(n) for n in line.split()[1:]}
    elif line:
        name, rest = line.split("==")
        version, *how = rest.split()
        entries[norm(name)] = (name, version, bool(how))
problems = []
if not present:
    problems.append(f"{path}: no 'present:' line (the requirements already on the GPU machine)")
if problems:
    sys.exit("\n".join(problems))
if not os.path.isdir(dest):
    print(f"{path}: {len(entries)} wheels listed, well-formed; no {dest}/ here, so nothing else to check "
          f"(bash bench/prepare_gpu_wheels.sh downloads them)")
    sys.exit(0)

try:
    from packaging.markers import Marker  # noqa: F401
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
# The GPU machine: CPython 3.12 on Linux x86_64.
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
found, total = {}, 0
for f in wheels:
    parts = f[:-4].split("-")
    key, version, (py, abi, plat) = norm(parts[0]), parts[1], parts[-3:]
    total += os.path.getsize(os.path.join(dest, f))
    if key not in entries:
        problems.append(f"{dest}/{f}: not in {path} (remove it: two versions of one package stop the install)")
        continue
    if entries[key][1] != version:
        problems.append(f"{dest}/{f}: {path} pins {entries[key][0]}=={entries[key][1]}")
    found[key] = f
    py_ok = any(t in ("py3", "py312", "cp312") for t in py.split("."))
    abi_ok = any(t in ("none", "abi3", "cp312") for t in abi.split("."))
    plat_ok = plat == "any" or any(re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t) for t in plat.split("."))
    if not (py_ok and abi_ok and plat_ok):
        problems.append(f"{dest}/{f}: not installable on CPython 3.12 manylinux x86_64 ({py}-{abi}-{plat})")
    if entries[key][2] and (abi, plat) != ("none", "any"):
        problems.append(f"{dest}/{f}: built here, so it must be pure Python (py3-none-any), got {py}-{abi}-{plat}")
    with zipfile.ZipFile(os.path.join(dest, f)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = norm(req.name)
        if name in entries:
            if not req.specifier.contains(entries[name][1], prereleases=True):
                problems.append(f"{dest}/{f}: needs {req}, but {path} pins {entries[name][0]}=={entries[name][1]}")
        elif name not in present:
            problems.append(f"{dest}/{f}: needs {req}, neither listed in {path} nor on its 'present:' line")
for key, (name, version, _) in entries.items():
    if key not in found:
        problems.append(f"{dest}/: no wheel for {name}=={version} (run bash bench/prepare_gpu_wheels.sh)")
mib = 1 << 20
print(f"{dest}/: {len(wheels)} wheels, {total / mib:.1f} MiB; working tree {tree_bytes / mib:.1f} MiB; "
      f"together {(total + tree_bytes) / mib:.1f} MiB of the 64 MiB that may travel")
if total + tree_bytes > 64 * mib:
    problems.append(f"{dest}/ and the working tree together are over 64 MiB: drop a wheel (bitsandbytes is the big one)")
if not ignored:
    print(f"warning: {dest}/ is not ignored by git; add the line '.whl/' to .gitignore (or "
          f"`echo /.whl/ >> .git/info/exclude`), then name .whl in the device run's carry")
if problems:
    sys.exit("\n".join(problems))
print("wheels: ok")
PY
}

if [[ $MODE == download ]]; then
    download
    prune
fi
check
