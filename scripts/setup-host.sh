#!/usr/bin/env bash
# Prepare this machine for SafeMail IaC: Debian packages for the lab (root), then the Python
# environment (.venv, scripts/setup-venv.sh). Safe to run again: it installs only what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  debootstrap systemd-container qemu-system-x86 qemu-utils e2fsprogs
  nftables cryptsetup-bin iproute2 openssh-client apt-utils dpkg-dev
  make git python3-venv
  # sfdisk reads the VMware template's partition table (tests/test_lab_template.py).
  fdisk
  # The vSphere API simulator for tests/test_vmware_provision_sim.py (tools/vsphere-sim).
  golang-go golang-github-vmware-govmomi-dev
  # python-ldap (pyproject, controller extra) compiles against OpenLDAP's libldap; the
  # directory client's unit tests start a real slapd of their own (tests/test_participant_directory.py).
  libldap2-dev libsasl2-dev slapd
)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: setup needs root (it installs Debian packages and the lab runs as root)" >&2
  exit 1
fi

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  # slapd is only a program for the unit tests: no database of its own, no running service.
  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

bash scripts/setup-venv.sh
