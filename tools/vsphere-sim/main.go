// vsphere-sim: a vCenter API simulator for tests/test_vmware_provision_sim.py, built from
// govmomi's simulator package as Debian ships it (golang-github-vmware-govmomi-dev 0.24.2,
// which has no vcsim command) by build.sh, in GOPATH mode with a patched copy of the package
// (simulator.patch).
//
// It serves the vSphere API on a loopback port over TLS and, before it answers, makes the
// vSphere side that docs/production.md ("The VMs") expects to exist before
// playbooks/vmware-provision.yml runs: a datacenter with a cluster of ESXi hosts, a datastore
// on them, a distributed switch with those hosts and no port groups, the VM folder and the
// template (powered off, one paravirtual SCSI disk, one vmxnet3 NIC). The names come from the
// flags (the test passes the inventory's group_vars/all/vsphere.yml). Nothing else is made: no
// VMs, no port groups. TLS uses the certificate the caller made (-tls-cert, -tls-key): Go's own test
// certificate has a 1024-bit RSA key, which Debian's OpenSSL rejects. The first line on stdout is the SDK URL; it runs
// until killed (SIGTERM).
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/vpx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

func check(err error, what string) {
	if err != nil {
		log.Fatalf("vsphere-sim: %s: %v", what, err)
	}
}

func wait(ctx context.Context, task *object.Task, err error, what string) types.AnyType {
	check(err, what)
	info, err := task.WaitForResult(ctx, nil)
	check(err, what)
	return info.Result
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: a free one)")
	user := flag.String("username", "user", "the only user name accepted")
	pass := flag.String("password", "pass", "its password")
	dcName := flag.String("datacenter", "DC0", "datacenter name")
	clusterName := flag.String("cluster", "C0", "cluster name")
	dsName := flag.String("datastore", "DS0", "datastore name (local, on every host of the cluster)")
	dsDir := flag.String("datastore-dir", "", "directory that holds the datastore's files")
	dvsName := flag.String("dvswitch", "DVS0", "distributed switch name (the cluster's hosts are members)")
	folderPath := flag.String("folder", "", "VM folder path to create, /<datacenter>/vm/<name>")
	template := flag.String("template", "template", "name of the template to create")
	certFile := flag.String("tls-cert", "", "the server's TLS certificate (PEM)")
	keyFile := flag.String("tls-key", "", "its private key (PEM)")
	flag.Parse()
	if *dsDir == "" || *certFile == "" || *keyFile == "" {
		log.Fatal("vsphere-sim: -datastore-dir, -tls-cert and -tls-key are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	check(err, "TLS certificate")

	// 0.24.2's vCenter model answers as API 6.5, but its types are the 7.0 API (vim25.Version).
	// Clients send only the fields of the version the server names: with 6.5, pyvmomi drops
	// VMwareDVSPortgroupPolicy.macManagementOverrideAllowed (6.7), so community.vmware's
	// vmware_dvs_portgroup reads it back unset, compares it with its default (false) and
	// reconfigures every port group on every run. A vCenter 7.0 answers "7.0.0.0" (the form
	// pyvmomi knows; a bare "7.0" makes it fall back to 6.0) and keeps the field.
	vpx.ServiceContent.About.Version = "7.0.0"
	vpx.ServiceContent.About.ApiVersion = vim25.Version + ".0.0"
	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 1
	model.ClusterHost = 3
	model.Host = 0
	model.Datastore = 0
	model.Machine = 0
	model.Portgroup = 0
	check(model.Create(), "create the model")

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	server := model.Service.NewServer()

	ctx := context.Background()
	client, err := govmomi.NewClient(ctx, server.URL, true)
	check(err, "log in to the simulator")
	finder := find.NewFinder(client.Client, true)

	dc, err := finder.Datacenter(ctx, "DC0")
	check(err, "find DC0")
	task, err := dc.Rename(ctx, *dcName)
	wait(ctx, task, err, "rename the datacenter")
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	check(err, "datacenter folders")

	cluster, err := finder.ClusterComputeResource(ctx, "DC0_C0")
	check(err, "find DC0_C0")
	task, err = cluster.Rename(ctx, *clusterName)
	wait(ctx, task, err, "rename the cluster")
	hosts, err := cluster.Hosts(ctx)
	check(err, "cluster hosts")

	check(os.MkdirAll(*dsDir, 0o755), "datastore directory")
	for _, host := range hosts {
		dss, err := host.ConfigManager().DatastoreSystem(ctx)
		check(err, "datastore system")
		_, err = dss.CreateLocalDatastore(ctx, *dsName, *dsDir)
		check(err, "create the datastore")
	}

	var dvsSpec types.DVSCreateSpec
	dvsSpec.ConfigSpec = &types.VMwareDVSConfigSpec{DVSConfigSpec: types.DVSConfigSpec{Name: *dvsName}}
	task, err = folders.NetworkFolder.CreateDVS(ctx, dvsSpec)
	dvsRef := wait(ctx, task, err, "create the distributed switch").(types.ManagedObjectReference)
	// The simulator's CreateDVS ignores host members; a reconfigure adds them.
	members := &types.DVSConfigSpec{}
	for _, host := range hosts {
		members.Host = append(members.Host, types.DistributedVirtualSwitchHostMemberConfigSpec{
			Operation: string(types.ConfigSpecOperationAdd),
			Host:      host.Reference(),
		})
	}
	task, err = object.NewDistributedVirtualSwitch(client.Client, dvsRef).Reconfigure(ctx, members)
	wait(ctx, task, err, "add the cluster's hosts to the distributed switch")

	vmFolder := folders.VmFolder
	if *folderPath != "" {
		prefix := "/" + *dcName + "/vm/"
		if !strings.HasPrefix(*folderPath, prefix) {
			log.Fatalf("vsphere-sim: -folder %s is not under %s", *folderPath, prefix)
		}
		for _, name := range strings.Split(strings.TrimPrefix(*folderPath, prefix), "/") {
			vmFolder, err = vmFolder.CreateFolder(ctx, name)
			check(err, "create folder "+name)
		}
	}

	pool, err := cluster.ResourcePool(ctx)
	check(err, "cluster resource pool")
	scsi, err := object.SCSIControllerTypes().CreateSCSIController("pvscsi")
	check(err, "SCSI controller")
	devices := object.VirtualDeviceList{scsi}
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{},
		fmt.Sprintf("[%s] %s/%s.vmdk", *dsName, *template, *template))
	disk.CapacityInKB = 10 * 1024 * 1024
	devices = append(devices, disk)
	network, err := finder.Network(ctx, "VM Network")
	check(err, "find VM Network")
	backing, err := network.EthernetCardBackingInfo(ctx)
	check(err, "VM Network backing")
	nic, err := object.EthernetCardTypes().CreateEthernetCard("vmxnet3", backing)
	check(err, "NIC")
	devices = append(devices, nic)
	deviceChange, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	check(err, "device spec")
	spec := types.VirtualMachineConfigSpec{
		Name:         *template,
		GuestId:      string(types.VirtualMachineGuestOsIdentifierDebian11_64Guest), // 0.24.2 knows no debian12
		NumCPUs:      1,
		MemoryMB:     1024,
		DeviceChange: deviceChange,
		Files:        &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", *dsName)},
	}
	task, err = vmFolder.CreateVM(ctx, spec, pool, hosts[0])
	result := wait(ctx, task, err, "create the template VM")
	vm := object.NewVirtualMachine(client.Client, result.(types.ManagedObjectReference))
	check(vm.MarkAsTemplate(ctx), "mark the template")

	fmt.Println(server.URL.String())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Close()
	model.Remove()
}
