// Command testbed is a multi-call binary holding the real Kubernetes control-plane
// components that Weft's test bed runs: etcd (embedded), kube-apiserver,
// kube-controller-manager and kubectl, all built from the official Go modules at the
// version pinned in go.mod. It is test infrastructure only; no Weft product code is Go.
//
// Usage: testbed <etcd|kube-apiserver|kube-controller-manager|kubectl> [flags...]
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"

	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	// Called through a symlink named after the component, or as `testbed <component> ...`.
	name := filepath.Base(os.Args[0])
	args := os.Args
	if name == "testbed" {
		if len(os.Args) < 2 {
			fmt.Fprintln(os.Stderr, "usage: testbed <etcd|kube-apiserver|kube-controller-manager|kubectl> [flags...]")
			os.Exit(2)
		}
		name = os.Args[1]
		args = append([]string{name}, os.Args[2:]...)
	}
	os.Args = args

	switch name {
	case "etcd":
		os.Exit(runEtcd(os.Args[1:]))
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kubectl":
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
		command := kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "testbed: unknown component %q\n", name)
		os.Exit(2)
	}
}
