// masqd-cni: the CNI plugin that hands a container's addresses to the masqd daemon.
//
// A runtime runs it after an interface plugin (bridge with ipMasq false) in a conflist. It
// takes the sandbox IPs of CNI_IFNAME from prevResult and asks masqd, over its Unix socket,
// to masquerade them; the daemon owns the nftables table. The CNI project's own library
// (skel, types, version) does the protocol: environment checks, version negotiation,
// prevResult parsing and conversion, error objects. See docs/cni.md for the contract.
//
// Output discipline: the result or the CNI error object goes to stdout (libcni reads it);
// diagnostics go to stderr, one line each.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

const latestVersion = "1.1.0"

func main() {
	os.Exit(run())
}

func run() (status int) {
	p := &plugin{
		stdout:     os.Stdout,
		stderr:     os.Stderr,
		now:        time.Now,
		sleep:      time.Sleep,
		delTimeout: delTimeout,
	}
	// A bug must still reach the runtime as a CNI error object, not as a Go stack trace.
	defer func() {
		if r := recover(); r != nil {
			status = fail(p, latestVersion, types.NewError(types.ErrInternal, "internal error in masqd-cni", fmt.Sprint(r)))
		}
	}()
	// Read the config first, to answer errors in the config's own cniVersion (skel's error
	// object has none), then hand skel the same bytes.
	var stdin []byte
	if command := os.Getenv("CNI_COMMAND"); command != "" && command != "VERSION" {
		var err error
		if stdin, err = io.ReadAll(os.Stdin); err != nil {
			return fail(p, latestVersion, types.NewError(types.ErrIOFailure, "error reading from stdin", err.Error()))
		}
		if err := replaceStdin(stdin); err != nil {
			return fail(p, latestVersion, types.NewError(types.ErrInternal, "cannot pass the config on", err.Error()))
		}
	}
	if e := skel.PluginMainFuncsWithError(p.funcs(), version.PluginSupports(supportedVersions...), ""); e != nil {
		cniVersion, network := replyVersion(stdin)
		return failIn(p, cniVersion, network, e)
	}
	return 0
}

// replaceStdin makes os.Stdin a pipe that yields `data` again, for skel to read.
func replaceStdin(data []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	go func() {
		_, _ = w.Write(data)
		_ = w.Close()
	}()
	os.Stdin = r
	return nil
}

// replyVersion: the config's cniVersion when this plugin speaks it, else the latest; and
// the network's name, for the log line.
func replyVersion(stdin []byte) (string, string) {
	var conf struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
	}
	if json.Unmarshal(stdin, &conf) == nil {
		for _, v := range supportedVersions {
			if v == conf.CNIVersion {
				return v, conf.Name
			}
		}
	}
	return latestVersion, conf.Name
}

func fail(p *plugin, cniVersion string, e *types.Error) int {
	return failIn(p, cniVersion, "", e)
}

// failIn prints the spec's error object (with cniVersion, and details even when empty),
// logs it on stderr as "masqd-cni: COMMAND network/container/ifname: error ...", and gives
// the exit status.
func failIn(p *plugin, cniVersion, network string, e *types.Error) int {
	summary := fmt.Sprintf("error %d: %s", e.Code, e.Msg)
	if e.Details != "" {
		summary += ": " + e.Details
	}
	label, key := os.Getenv("CNI_COMMAND"), network
	if id := os.Getenv("CNI_CONTAINERID"); id != "" {
		key = network + "/" + id + "/" + os.Getenv("CNI_IFNAME")
	}
	if key != "" {
		label += " " + key
	}
	fmt.Fprintf(p.stderr, "masqd-cni: %s: %s\n", label, summary)
	obj := struct {
		CNIVersion string `json:"cniVersion"`
		Code       uint   `json:"code"`
		Msg        string `json:"msg"`
		Details    string `json:"details"`
	}{cniVersion, e.Code, e.Msg, e.Details}
	data, _ := json.Marshal(obj)
	fmt.Fprintf(p.stdout, "%s\n", data)
	return 1
}
