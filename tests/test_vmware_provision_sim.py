"""playbooks/vmware-provision.yml against a vSphere API simulator (issue 15, item 4).

No vCenter is reachable from the project's machines, so the playbook runs against govmomi's
vCenter simulator: tools/vsphere-sim (main.go, built by build.sh from Debian's
golang-github-vmware-govmomi-dev with golang-go, GOPATH mode, cached under
/var/cache/safemail/vsphere-sim). The simulator starts on 127.0.0.1 on a free port with what
docs/production.md expects before the playbook runs, named as the production inventory's
group_vars/all/vsphere.yml names it: datacenter, cluster, datastore, distributed switch (no
port groups), VM folder and template. Then the playbook runs twice on the committed
production inventory (vault opened with the published example password), pointed at the
simulator only by what an operator sets too: the vCenter host name (-e), port, user and
password (VMWARE_PORT, VMWARE_USER, VMWARE_PASSWORD) and a CA file that holds the simulator's
certificate (SSL_CERT_FILE; the playbook keeps validate_certs: true). The first run creates,
the second must report changed=0 for every host. What the playbook made is read back through
the API with pyvmomi: per host the VM (name, folder, powered on, vCPUs, memory), its disks
(system disk size, the data disk on relay and store only, on the paravirtual controller),
disk.EnableUUID, its two vmxnet3 NICs on the right port groups; and the port groups (one per
segment, on the switch, with the VLAN of the network plan, nothing else).

Time: about 14 s on this machine (2 cores) with the simulator already built (two playbook
runs of 7 hosts and the API checks); the first build adds about 30 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INVENTORY = REPO / "inventories/production"
SIM = REPO / "tools/vsphere-sim"
GOVMOMI_SIMULATOR = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")
DATA_DISK_GROUPS = {"relay", "store"}
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)

pytestmark = [
    pytest.mark.skipif(shutil.which("go") is None,
                       reason="go is missing (Debian golang-go; scripts/setup-host.sh)"),
    pytest.mark.skipif(not GOVMOMI_SIMULATOR.is_dir(),
                       reason="govmomi's simulator source is missing (Debian "
                              "golang-github-vmware-govmomi-dev; scripts/setup-host.sh)"),
]


def _vsphere() -> dict:
    return yaml.safe_load((INVENTORY / "group_vars/all/vsphere.yml").read_text())


def _hosts() -> dict[str, dict]:
    """Every host of hosts.yml: its groups and its variables over vsphere.yml's defaults."""
    defaults = {k: v for k, v in _vsphere().items() if k.startswith("safemail_vm_")}
    out: dict[str, dict] = {}

    def walk(name: str, node: dict, groups: list[str]) -> None:
        for host, hvars in (node.get("hosts") or {}).items():
            entry = out.setdefault(host, {"groups": set(), "vars": dict(defaults)})
            entry["groups"].update(groups + [name])
            entry["vars"].update(hvars or {})
        for child, cnode in (node.get("children") or {}).items():
            walk(child, cnode or {}, groups + [name])

    walk("all", yaml.safe_load((INVENTORY / "hosts.yml").read_text())["all"], [])
    return out


def _example_password() -> str:
    found = re.search(r"example vault password is `([^`]+)`",
                      (REPO / "docs/production.md").read_text())
    assert found, "docs/production.md publishes the example vault password"
    return found.group(1)


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the simulator's, and the client's CA file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vsphere-sim test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "sim-cert.pem", directory / "sim-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


CLONE_NEWNET = 0x40000000  # <sched.h>; os.setns is Python 3.12


def netns_unavailable() -> str | None:
    """Why this machine cannot give a test its own network namespace (None: it can)."""
    if os.geteuid() != 0:
        return "needs root: the test makes its own network namespace (ip netns add)"
    if shutil.which("ip") is None:
        return "ip is missing (Debian iproute2): the test makes its own network namespace"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return f"ip netns is unavailable: {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def network_namespace():
    """A network namespace of this test's own, `smvsim-<pid>`, with its loopback up (so the
    simulator can take 127.0.0.1:443 without taking the machine's port 443); deleted on the
    way out, also when the test fails."""
    name = f"smvsim-{os.getpid()}"

    def ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"

    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True,
                       check=False)


@contextlib.contextmanager
def _inside(netns: str | None):
    """This thread in `netns` while the block runs (sockets made there stay there)."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, \
            open(f"/run/netns/{netns}", "rb") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


class Simulator:
    def __init__(self, tmp: Path, template: str | None = None, netns: str | None = None) -> None:
        """`template`: the name of the template the simulator makes (default: the inventory's;
        tests/test_vmware_template_sim.py uploads that one itself). `netns`: run in that
        network namespace on 127.0.0.1:443, as a vCenter listens (default: here, on a free
        loopback port)."""
        build = subprocess.run(["bash", str(SIM / "build.sh")], capture_output=True, text=True,
                               timeout=600, check=False)
        assert build.returncode == 0, build.stderr
        binary = build.stdout.strip().splitlines()[-1]
        v = _vsphere()
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.cert, key = _certificate(tmp)
        self.user = "sim-operator@vsphere.local"
        self.password = secrets.token_urlsafe(16)
        self.log = tmp / "vsphere-sim.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, binary, "-listen", "127.0.0.1:443" if netns else "127.0.0.1:0",
                 "-username", self.user,
                 "-password", self.password, "-tls-cert", str(self.cert), "-tls-key", str(key),
                 "-datacenter", v["safemail_vsphere_datacenter"],
                 "-cluster", v["safemail_vsphere_cluster"],
                 "-datastore", v["safemail_vsphere_datastore"],
                 "-datastore-dir", str(tmp / "datastore"),
                 "-dvswitch", v["safemail_vsphere_dvswitch"],
                 "-folder", v["safemail_vsphere_folder"],
                 "-template", template or v["safemail_vsphere_template"]],
                stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()  # the SDK URL once the inventory is made
        found = re.match(r"https://[^@]+@127\.0\.0\.1:(\d+)/sdk$", line.strip())
        if not found:
            self.stop()
            raise AssertionError(f"simulator did not start: {line!r}\n{self.log.read_text()}")
        self.port = int(found.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    simulator = Simulator(tmp_path_factory.mktemp("vsphere-sim"))
    try:
        yield simulator
    finally:
        simulator.stop()


def _playbook(sim: Simulator, tmp: Path) -> subprocess.CompletedProcess[str]:
    password = tmp / "example-vault-password"
    password.write_text(_example_password() + "\n")
    password.chmod(0o600)
    extra = tmp / "vcenter.yml"
    # The simulator's VMs have no guest (no open-vm-tools) and so never report an address.
    extra.write_text(yaml.safe_dump({"safemail_vsphere_hostname": "127.0.0.1",
                                     "safemail_vsphere_wait_for_ip": False}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "VMWARE_USER": sim.user, "VMWARE_PASSWORD": sim.password,
           "VMWARE_PORT": str(sim.port), "SSL_CERT_FILE": str(sim.cert),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE", "VMWARE_HOST",
                 "VMWARE_VALIDATE_CERTS", "SSL_CERT_DIR"):
        env.pop(name, None)
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(INVENTORY),
         str(REPO / "playbooks/vmware-provision.yml"),
         "--vault-id", f"production@{password}", "-e", f"@{extra}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)


def _recap(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)),
                         "unreachable": int(m.group(4)), "failed": int(m.group(5))}
            for m in RECAP.finditer(proc.stdout)}


@pytest.fixture(scope="module")
def runs(sim, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vmware-provision")
    first = _playbook(sim, tmp)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    second = _playbook(sim, tmp)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    return first, second


@contextlib.contextmanager
def connected(sim):
    """The simulator's API content over a verified TLS session (also for the template test),
    in the simulator's network namespace if it has one (this thread enters it for the block)."""
    from pyVim.connect import Disconnect, SmartConnect

    context = ssl.create_default_context(cafile=str(sim.cert))
    with _inside(sim.netns):
        si = SmartConnect(host="127.0.0.1", port=sim.port, user=sim.user, pwd=sim.password,
                          sslContext=context)
        try:
            yield si.RetrieveContent()
        finally:
            Disconnect(si)


@pytest.fixture(scope="module")
def api(sim, runs):
    with connected(sim) as content:
        yield content


def _all(content, vimtype) -> list:
    view = content.viewManager.CreateContainerView(content.rootFolder, [vimtype], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def test_the_first_run_creates_every_host_and_the_second_changes_nothing(runs):
    first, second = runs
    hosts = set(_hosts())
    one, two = _recap(first), _recap(second)
    assert set(one) == hosts and set(two) == hosts, (one, two)
    for host in hosts:
        assert one[host]["failed"] == 0 and one[host]["changed"] >= 1, (host, one[host])
        assert two[host]["failed"] == 0 and two[host]["unreachable"] == 0, (host, two[host])
        assert two[host]["changed"] == 0, f"{host}: the second run changed something\n" + \
            second.stdout[-6000:]


def test_port_groups_one_per_segment_on_the_switch_with_its_vlan(api):
    from pyVmomi import vim

    v = _vsphere()
    (dvs,) = [d for d in _all(api, vim.DistributedVirtualSwitch)
              if d.name == v["safemail_vsphere_dvswitch"]]
    # The switch's own uplink port group (vSphere names it <switch>-DVUplinks-<n>; the
    # simulator does not list it in config.uplinkPortgroup) is not one of the playbook's.
    uplink = re.compile(re.escape(dvs.name) + r"-DVUplinks-\d+")
    uplinks = {pg.key for pg in dvs.config.uplinkPortgroup}
    groups = {pg.name: pg for pg in dvs.portgroup
              if pg.key not in uplinks and not uplink.fullmatch(pg.name)}
    wanted = {seg["portgroup"]: seg["vlan"] for seg in v["safemail_vsphere_segments"].values()}
    assert set(groups) == set(wanted)
    for name, vlan in wanted.items():
        assert groups[name].config.defaultPortConfig.vlan.vlanId == vlan, name
        assert groups[name].config.type == "earlyBinding", name  # port_binding: static


def test_every_host_is_a_powered_on_vm_of_its_size_in_the_folder(api):
    from pyVmomi import vim

    v = _vsphere()
    folder = v["safemail_vsphere_folder"].rstrip("/").rsplit("/", 1)[1]
    hosts = _hosts()
    vms = {vm.name: vm for vm in _all(api, vim.VirtualMachine) if not vm.config.template}
    assert set(vms) == set(hosts), "one VM per host, no other"
    templates = [vm for vm in _all(api, vim.VirtualMachine) if vm.config.template]
    assert [t.name for t in templates] == [v["safemail_vsphere_template"]]
    # The clones did not change the template: still its one disk and one NIC, off.
    devices = templates[0].config.hardware.device
    assert len([d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]) == 1
    assert len([d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]) == 1
    assert templates[0].runtime.powerState == "poweredOff"
    for name, host in hosts.items():
        vm, hv = vms[name], host["vars"]
        assert vm.parent.name == folder, name
        assert vm.runtime.powerState == "poweredOn", name
        assert vm.config.hardware.numCPU == int(hv["safemail_vm_cpus"]), name
        assert vm.config.hardware.memoryMB == int(hv["safemail_vm_memory_mb"]), name


def test_disks_and_enable_uuid(api):
    from pyVmomi import vim

    hosts = _hosts()
    vms = {vm.name: vm for vm in _all(api, vim.VirtualMachine) if not vm.config.template}
    for name, host in hosts.items():
        vm, hv = vms[name], host["vars"]
        devices = vm.config.hardware.device
        disks = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)),
                       key=lambda d: d.unitNumber)
        controllers = {d.key: d for d in devices
                       if isinstance(d, vim.vm.device.VirtualSCSIController)}
        sizes = [d.capacityInKB // (1024 * 1024) for d in disks]
        want = [int(hv["safemail_vm_disk_gb"])]
        if host["groups"] & DATA_DISK_GROUPS:
            want.append(int(hv["safemail_vm_data_disk_gb"]))
        assert sizes == want, (name, sizes)
        if len(disks) == 2:
            data = disks[1]
            assert data.unitNumber == 1, name
            assert isinstance(controllers[data.controllerKey],
                              vim.vm.device.ParaVirtualSCSIController), name
            assert controllers[data.controllerKey].busNumber == 0, name
        extra = {o.key: o.value for o in vm.config.extraConfig}
        assert extra.get("disk.EnableUUID") == "TRUE", name


def test_two_vmxnet3_nics_on_mgmt_and_the_hosts_segment(api):
    from pyVmomi import vim

    v = _vsphere()
    segments = v["safemail_vsphere_segments"]
    (dvs,) = [d for d in _all(api, vim.DistributedVirtualSwitch)
              if d.name == v["safemail_vsphere_dvswitch"]]
    by_key = {pg.key: pg.name for pg in dvs.portgroup}
    vms = {vm.name: vm for vm in _all(api, vim.VirtualMachine) if not vm.config.template}
    for name, host in _hosts().items():
        nics = [d for d in vms[name].config.hardware.device
                if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert all(isinstance(n, vim.vm.device.VirtualVmxnet3) for n in nics), name
        networks = [by_key.get(getattr(n.backing, "port", None) and n.backing.port.portgroupKey)
                    for n in nics]
        assert networks == [segments["mgmt"]["portgroup"],
                            segments[host["vars"]["safemail_segment"]]["portgroup"]], name
