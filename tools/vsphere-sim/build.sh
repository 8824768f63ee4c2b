#!/usr/bin/env bash
# Build the vSphere API simulator (main.go) from Debian's govmomi source, without the Go module
# proxy: golang-go in GOPATH mode, /usr/share/gocode from golang-github-vmware-govmomi-dev
# (scripts/setup-host.sh installs both), and a copy of its simulator package patched with
# simulator.patch earlier in GOPATH. The binary goes to the cache directory
# (outside the repository) and is reused while main.go, the patch, this script, the govmomi
# package and Go are the same. Prints the binary's path as its last line.
#
#   tools/vsphere-sim/build.sh          # about a minute the first time, then instant
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SAFEMAIL_VSPHERE_SIM_CACHE:-/var/cache/safemail/vsphere-sim}
gocode=/usr/share/gocode
govmomi=github.com/vmware/govmomi

command -v go >/dev/null || { echo "vsphere-sim: go is missing (apt-get install golang-go)" >&2; exit 2; }
[ -d "$gocode/src/$govmomi/simulator" ] || {
  echo "vsphere-sim: $gocode/src/$govmomi/simulator is missing" \
       "(apt-get install golang-github-vmware-govmomi-dev)" >&2; exit 2; }

key=$( { cat "$here/main.go" "$here/simulator.patch" "$here/build.sh"
         dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || true
         go version; } | sha256sum | cut -c1-16)
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -x "$cache/vsphere-sim" ] && [ "$(cat "$cache/key" 2>/dev/null)" = "$key" ]; then
  echo "$cache/vsphere-sim"
  exit 0
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/gopath/src/$govmomi" "$work/gopath/src/safemail/vsphere-sim"
cp -r "$gocode/src/$govmomi/simulator" "$work/gopath/src/$govmomi/simulator"
# The directory above the copy hides Debian's package github.com/vmware/govmomi in GOPATH
# mode: its files go beside the copy (its subpackages still come from /usr/share/gocode).
find "$gocode/src/$govmomi" -maxdepth 1 -name '*.go' ! -name '*_test.go' \
  -exec cp {} "$work/gopath/src/$govmomi/" \;
patch -s -p1 -d "$work/gopath/src/$govmomi" < "$here/simulator.patch"
cp "$here/main.go" "$work/gopath/src/safemail/vsphere-sim/main.go"
echo "vsphere-sim: building (GOPATH mode, about a minute)" >&2
( cd "$work/gopath/src/safemail/vsphere-sim" &&
  GO111MODULE=off GOFLAGS= GOPATH="$work/gopath:$gocode" GOCACHE="$cache/gocache" \
    go build -o "$work/vsphere-sim" . )
mv "$work/vsphere-sim" "$cache/vsphere-sim"
echo "$key" > "$cache/key"
echo "$cache/vsphere-sim"
