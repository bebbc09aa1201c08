#!/usr/bin/env bash
# Builds the Shadowplane .deb and .rpm (`make package`), into dist/ unless told otherwise.
#
#   packaging/build.sh [--release N] [--out DIR] [--format deb|rpm|all]
#
# The packages carry a self-contained venv at /opt/shadowplane/venv, made here with Debian's
# /usr/bin/python3 (the interpreter the packages depend on) and the versions pinned in requirements.lock.
# The distro's bcc and systemd modules are reached through two symlinks in its site-packages, not bundled.
#
# Building the venv is the slow part: it is staged in build/package/ and reused while its inputs (the code,
# pyproject.toml, requirements.lock, this script) are unchanged. A package already in the output directory
# built from the same inputs (those, packaging/, systemd/, the docs) is kept as it is. So another --release
# of the same code only re-runs nfpm: seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

RELEASE=1
OUT=$ROOT/dist
FORMATS="deb rpm"
while [ $# -gt 0 ]; do
  case "$1" in
    --release) RELEASE=$2; shift 2 ;;
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    --format)
      case "$2" in
        all) FORMATS="deb rpm" ;;
        deb | rpm) FORMATS=$2 ;;
        *) echo "build.sh: --format deb|rpm|all" >&2; exit 2 ;;
      esac
      shift 2 ;;
    -h | --help) sed -n '2,13p' "$0" | cut -c3-; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $RELEASE =~ ^[0-9][0-9a-z.+~]*$ ]] || { echo "build.sh: --release must start with a digit" >&2; exit 2; }

# The venv holds x86_64 wheels and nfpm.yaml says amd64: build where they run.
[ "$(uname -m)" = x86_64 ] || { echo "build.sh: builds amd64 packages, on x86_64 only" >&2; exit 1; }

say() { printf '\033[1m[package]\033[0m %s\n' "$*"; }

PY=/usr/bin/python3 # the distro's: the packages depend on it, and its bcc / systemd modules match it
PIP=$ROOT/.venv/bin/pip
NFPM=$ROOT/.venv/bin/nfpm
for tool in "$PY" "$PIP" "$NFPM"; do
  [ -x "$tool" ] || { echo "build.sh: $tool is missing: run make setup first" >&2; exit 1; }
done
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
PREFIX=/opt/shadowplane
VENV=$PREFIX/venv
WORK=$ROOT/build/package
STAGE=$WORK/root # the file tree of the packages, as it will be on the target
SVENV=$STAGE$VENV

# What the venv is made from, and (a superset) what the packages are made from. Not lab/: the wheel leaves
# it out (pyproject.toml's packages.find), so a change to the lab must not rebuild the packages.
venv_hash() {
  {
    find shadowplane agentd controller shadowctl training -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum pyproject.toml requirements.lock packaging/build.sh
    "$PY" -c 'import sys; print(sys.version)'
  } | sha256sum | cut -c1-16
}
package_hash() {
  {
    echo "$VENV_HASH"
    find packaging systemd -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum README.md docs/operations.md
  } | sha256sum | cut -c1-16
}
VENV_HASH=$(venv_hash)
HASH=$(package_hash)

# ---- the venv (slow) --------------------------------------------------------------------------------
build_venv() {
  say "building the venv for $VERSION (inputs $VENV_HASH) in $WORK"
  rm -rf "$WORK"
  mkdir -p "$WORK/wheels" "$STAGE"
  # setuptools reuses build/lib: a module deleted since the last build would come back from there.
  rm -rf build/lib build/bdist.*
  "$PIP" wheel -q --no-deps --disable-pip-version-check --wheel-dir "$WORK/wheels" .
  "$PY" -m venv --without-pip "$SVENV"
  # The project and its runtime dependencies only (no dev or test tools, no `train` extra: onnx is needed
  # only to export models, onnxruntime serves them), at the locked versions. Bytecode is compiled below, once
  # the files are final.
  "$PIP" --python "$SVENV/bin/python" install -q --no-compile --no-warn-script-location \
    --disable-pip-version-check -c requirements.lock "$WORK"/wheels/shadowplane-*.whl
  local site=$SVENV/lib/python$PYVER/site-packages
  for mod in bcc systemd; do
    [ ! -e "$site/$mod" ] || { echo "build.sh: the venv has its own $mod module; it must use the distro's" >&2; exit 1; }
  done
  # nfpm.yaml adds the links to the distro's bcc and systemd modules. Made in the stage, used at
  # /opt/shadowplane/venv: rewrite every absolute path that names the stage (console-script shebangs,
  # pyvenv.cfg, activate scripts). Only text files hold such paths.
  grep -rlIZ --fixed-strings "$SVENV" "$SVENV" | xargs -0 -r sed -i "s#$SVENV#$VENV#g"
  find "$SVENV" -name direct_url.json -delete # names the build directory's wheel; pip does not need it
  # The wheels' compiled code as Debian ships its own: without symbol tables and shared objects not
  # executable. Libraries that auditwheel vendored (*.libs/) are left as they are: patchelf rewrote their
  # layout and strip would make them unloadable. Files with the x bit that are neither ELF nor scripts lose it.
  find "$SVENV" -type f -name '*.so*' ! -path '*.libs/*' -print0 | xargs -0 -r strip --strip-unneeded
  find "$SVENV" -type f -name '*.so*' -exec chmod 0644 {} +
  find "$SVENV/lib" -type f -perm /111 ! -name '*.so*' -print0 | while IFS= read -r -d '' f; do
    [ "$(head -c 2 "$f")" = '#!' ] || chmod 0644 "$f"
  done
  "$SVENV/bin/python" -c 'import agentd.daemon, controller.server, shadowctl.cli, onnxruntime, numpy' \
    || { echo "build.sh: the staged venv cannot import the daemons" >&2; exit 1; }
  find "$SVENV" -depth -type d -name __pycache__ -exec rm -rf {} +
  # The bytecode ships in the package, so installing is unpacking: compiling ~250 MB of venv in postinst
  # took minutes on a slow host (over 2 min in the emulated test VM), during which the package was half
  # configured. Hash-based and unchecked, as dpkg owns .py and .pyc alike and only an upgrade changes either:
  # Python never rewrites them (the sandboxed daemons could not), and file times do not matter. The file
  # names recorded in the bytecode are the installed ones (tracebacks name /opt/shadowplane/...). A module
  # that does not compile (some wheels carry Python 2 test files) is skipped, as pip would.
  "$SVENV/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$SVENV" -p "$VENV" \
    "$SVENV/lib" >/dev/null || true
  if grep -rlI --fixed-strings "$WORK" "$SVENV"; then
    echo "build.sh: the files above still name the build directory" >&2
    exit 1
  fi
  echo "$VENV_HASH" >"$WORK/.venv-inputs"
}

if [ "$(cat "$WORK/.venv-inputs" 2>/dev/null)" = "$VENV_HASH" ] && [ -x "$SVENV/bin/python" ]; then
  say "reusing the staged venv (inputs $VENV_HASH unchanged)"
else
  build_venv
fi

# ---- the other staged files (cheap: always laid anew) ---------------------------------------------------
rm -rf "$STAGE/usr"
doc=$STAGE/usr/share/doc/shadowplane
install -D -m 0644 packaging/copyright "$doc/copyright"
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 docs/operations.md "$doc/operations.md"
# The Debian changelog must name the version it ships in: a build of another release gets an entry on top.
top=$(sed -n '1s/^shadowplane (\(.*\)).*/\1/p' packaging/changelog)
{
  if [ "$top" != "$VERSION-$RELEASE" ]; then
    printf 'shadowplane (%s-%s) unstable; urgency=medium\n\n  * Rebuild of %s as release %s.\n\n' \
      "$VERSION" "$RELEASE" "$top" "$RELEASE"
    printf ' -- %s  %s\n\n' "$(sed -n 's/^maintainer: //p' packaging/nfpm.yaml)" "$(date -R)"
  fi
  cat packaging/changelog
} | gzip -9n >"$doc/changelog.Debian.gz"
mkdir -p "$STAGE/usr/share/man/man1" "$STAGE/usr/share/man/man8"
gzip -9n -c packaging/man/shadowctl.1 >"$STAGE/usr/share/man/man1/shadowctl.1.gz"
for m in shadowplane-agentd shadowplane-controller; do
  gzip -9n -c "packaging/man/$m.8" >"$STAGE/usr/share/man/man8/$m.8.gz"
done
install -D -m 0644 packaging/lintian-overrides "$STAGE/usr/share/lintian/overrides/shadowplane"
# Directories 0755, files 0644 or 0755, whatever the builder's umask was.
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -perm /111 -exec chmod 0755 {} +
find "$STAGE" -type f ! -perm /111 -exec chmod 0644 {} +

# ---- pack -----------------------------------------------------------------------------------------
mkdir -p "$OUT"
export SHADOWPLANE_VERSION=$VERSION SHADOWPLANE_RELEASE=$RELEASE SHADOWPLANE_PYVER=$PYVER SHADOWPLANE_PYNEXT=$PYNEXT
for fmt in $FORMATS; do
  case $fmt in
    deb) file=$OUT/shadowplane_${VERSION}-${RELEASE}_amd64.deb ;;
    rpm) file=$OUT/shadowplane-${VERSION}-${RELEASE}.x86_64.rpm ;;
  esac
  stamp=$OUT/.$(basename "$file").inputs
  if [ -f "$file" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$HASH" ]; then
    say "up to date: $file"
    continue
  fi
  rm -f "$file" "$stamp"
  "$NFPM" package --config packaging/nfpm.yaml --packager "$fmt" --target "$file" >/dev/null
  echo "$HASH" >"$stamp"
  say "built $file ($(du -h "$file" | cut -f1))"
done
