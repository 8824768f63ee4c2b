"""playbooks/vmware-template.yml against the vSphere API simulator (issue 15, "The image").

The template directory is one `safemail lab template build` would write, around a tiny disk
(tests/test_lab_template.py's tiny_template: the real OVF and manifest code, a 1 MiB root
partition): the simulator (tools/vsphere-sim, govmomi 0.24.2) reads the OVF with
CreateImportSpec, takes the VMDK upload through an NFC lease (it counts the bytes and
discards them) and runs no disk, so whether the real template boots is `safemail lab template
check --boot`'s job (`make template`). Checked here through the API: the deploy makes one VM of
the inventory's template name in the folder, marked as template, with the OVF's guest OS,
CPUs and memory, its disk on a paravirtual SCSI controller and one vmxnet3 NIC on the mgmt
port group; the whole VMDK went up; a second run changes nothing; and
playbooks/vmware-provision.yml then clones every host of the production inventory from it.

vmware_deploy_ovf uploads the disk to the lease's device URL, https://*/nfc/..., with `*`
replaced by the vCenter host name and no port, so on port 443 as vSphere serves it, whatever
VMWARE_PORT says. The simulator therefore listens on 127.0.0.1:443 in a network namespace the
test makes itself (smvsim-<pid>, loopback up, deleted afterwards also on failure), and
ansible-playbook and the API checks run inside it: the machine's own port 443 stays free and
the playbook gets what an operator sets (host name, account, CA file), no port. Needs root and
`ip netns` (skipped, saying why, without them).

Time: about 20 s on this machine (2 cores) with the simulator already built, 33 s while the lab
runs (three playbook runs and the API checks).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import test_vmware_provision_sim as provision_sim
import yaml
from test_lab_template import tiny_template

from safemail.lab import template

REPO = provision_sim.REPO
BIN = provision_sim.BIN
NETNS_UNAVAILABLE = provision_sim.netns_unavailable()
pytestmark = [
    *provision_sim.pytestmark,
    pytest.mark.skipif(shutil.which("qemu-img") is None,
                       reason="qemu-img is missing (Debian qemu-utils; scripts/setup-host.sh)"),
    # vmware_deploy_ovf PUTs the disk to the NFC lease's device URL, https://*/nfc/..., with
    # `*` replaced by the vCenter host name and no port: 443, as vSphere has it. The simulator
    # listens there, in a network namespace of the test's own, and so does ansible-playbook.
    pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE)),
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with provision_sim.network_namespace() as netns:
        simulator = provision_sim.Simulator(tmp_path_factory.mktemp("vsphere-sim"),
                                            template="sim-made-template", netns=netns)
        try:
            yield simulator
        finally:
            simulator.stop()


def _run(sim, tmp: Path, playbook: str, extra: dict) -> subprocess.CompletedProcess[str]:
    """ansible-playbook in the simulator's namespace, with what an operator sets: the vCenter
    host name, the account and a CA file (no port: vCenter's 443)."""
    password = tmp / "example-vault-password"
    password.write_text(provision_sim._example_password() + "\n")
    password.chmod(0o600)
    extra_file = tmp / "extra.yml"
    extra_file.write_text(yaml.safe_dump({"safemail_vsphere_hostname": "127.0.0.1", **extra}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "VMWARE_USER": sim.user, "VMWARE_PASSWORD": sim.password,
           "SSL_CERT_FILE": str(sim.cert),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE", "VMWARE_HOST",
                 "VMWARE_PORT", "VMWARE_VALIDATE_CERTS", "SSL_CERT_DIR"):
        env.pop(name, None)
    assert sim.port == 443
    return subprocess.run(
        [*sim.prefix, str(BIN / "ansible-playbook"), "-i", str(provision_sim.INVENTORY),
         str(REPO / "playbooks" / playbook), "--vault-id", f"production@{password}",
         "-e", f"@{extra_file}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)


@pytest.fixture(scope="module")
def uploads(sim, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vmware-template")
    out = tiny_template(tmp / "template")
    assert template.check(out) == []
    extra = {"safemail_template_dir": str(out)}
    first = _run(sim, tmp, "vmware-template.yml", extra)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    second = _run(sim, tmp, "vmware-template.yml", extra)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    return out, first, second


@pytest.fixture
def api(sim, uploads):
    """The API content; the test runs in the simulator's namespace while it holds it."""
    with provision_sim.connected(sim) as content:
        yield content


def test_the_first_run_uploads_and_the_second_changes_nothing(uploads):
    _out, first, second = uploads
    one, two = provision_sim._recap(first), provision_sim._recap(second)
    assert one["localhost"]["changed"] >= 2 and one["localhost"]["failed"] == 0, one
    assert two["localhost"]["changed"] == 0, second.stdout[-4000:]


def test_the_template_has_the_ovfs_hardware(api, uploads, sim):
    from pyVmomi import vim

    v = provision_sim._vsphere()
    out = uploads[0]
    (tpl,) = [vm for vm in provision_sim._all(api, vim.VirtualMachine)
              if vm.name == v["safemail_vsphere_template"]]
    assert tpl.config.template is True
    assert tpl.parent.name == v["safemail_vsphere_folder"].rsplit("/", 1)[1]
    assert tpl.config.guestId == template.OVF_OS_TYPE
    assert tpl.config.hardware.numCPU == template.OVF_CPUS
    assert tpl.config.hardware.memoryMB == template.OVF_MEMORY_MB
    devices = tpl.config.hardware.device
    (disk,) = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    controllers = {d.key: d for d in devices
                   if isinstance(d, vim.vm.device.VirtualSCSIController)}
    assert isinstance(controllers[disk.controllerKey], vim.vm.device.ParaVirtualSCSIController)
    capacity = template.ovf_summary(template.Files(out).ovf.read_text())["disks"][0]["capacity"]
    assert disk.capacityInKB == capacity // 1024
    (nic,) = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert isinstance(nic, vim.vm.device.VirtualVmxnet3)
    (dvs,) = [d for d in provision_sim._all(api, vim.DistributedVirtualSwitch)
              if d.name == v["safemail_vsphere_dvswitch"]]
    by_key = {pg.key: pg.name for pg in dvs.portgroup}
    assert by_key[nic.backing.port.portgroupKey] == v["safemail_vsphere_segments"]["mgmt"][
        "portgroup"]
    vmdk = template.Files(out).vmdk
    # The simulator's NFC handler logs each upload: one, the whole VMDK, and none on the
    # second run.
    transfers = re.findall(r" nfc (?:PUT|POST) \S+: (.*)$", sim.log.read_text(), re.MULTILINE)
    assert transfers == [f"transferred {vmdk.stat().st_size} bytes"], \
        "the whole VMDK went up through the NFC lease, once"


def test_the_provisioning_playbook_clones_every_host_from_it(sim, uploads, tmp_path):
    from pyVmomi import vim  # noqa: F401 - pyvmomi is what the playbook needs too

    run = _run(sim, tmp_path, "vmware-provision.yml", {"safemail_vsphere_wait_for_ip": False})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    recap = provision_sim._recap(run)
    assert set(recap) == set(provision_sim._hosts())
    assert all(r["failed"] == 0 and r["changed"] >= 1 for r in recap.values()), recap
