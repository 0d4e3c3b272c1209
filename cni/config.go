package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Configuration: skel has already checked the environment, that stdin is JSON with a valid
// `name`, and that the config's cniVersion is supported. What is left is this plugin's keys
// and the parts of the standard ones it uses (prevResult, cni.dev/valid-attachments).

const (
	defaultSocket         = "/run/masqd/masqd.sock"
	defaultDaemonWait     = 10.0
	maxDaemonWaitSeconds  = 3600.0
	errPluginNotAvailable = 50 // the spec's code for STATUS: "plugin not available"
)

// validAttachmentKeys: the spec's key, then its older name.
var validAttachmentKeys = []string{"cni.dev/valid-attachments", "cni.dev/attachments"}

type netConf struct {
	CNIVersion string
	Name       string
	Socket     string
	DaemonWait float64
	raw        map[string]json.RawMessage
}

func cniError(code uint, msg, details string) *types.Error {
	return types.NewError(code, msg, details)
}

func parseConf(stdin []byte) (*netConf, *types.Error) {
	conf := &netConf{Socket: defaultSocket, DaemonWait: defaultDaemonWait}
	if err := json.Unmarshal(stdin, &conf.raw); err != nil {
		return nil, cniError(types.ErrDecodingFailure, "network config must be a JSON object", err.Error())
	}
	_ = json.Unmarshal(conf.raw["cniVersion"], &conf.CNIVersion) // skel decoded it already
	_ = json.Unmarshal(conf.raw["name"], &conf.Name)
	if raw, ok := conf.raw["socket"]; ok {
		var sock string
		if json.Unmarshal(raw, &sock) != nil || !strings.HasPrefix(sock, "/") {
			return nil, cniError(types.ErrInvalidNetworkConfig, "socket must be an absolute path", string(raw))
		}
		conf.Socket = sock
	}
	if raw, ok := conf.raw["daemonWaitSeconds"]; ok {
		var wait float64
		// A JSON number only: Unmarshal refuses true and "10" but takes null, hence the check.
		trimmed := bytes.TrimSpace(raw)
		isNumber := len(trimmed) > 0 && (trimmed[0] == '-' || trimmed[0] >= '0' && trimmed[0] <= '9')
		if !isNumber || json.Unmarshal(raw, &wait) != nil || wait < 0 || wait > maxDaemonWaitSeconds {
			return nil, cniError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("daemonWaitSeconds must be a number from 0 to %g", maxDaemonWaitSeconds), string(raw))
		}
		conf.DaemonWait = wait
	}
	return conf, nil
}

// prevResult: the result of the plugins before this one, which ADD and CHECK require, parsed
// by the CNI library in the config's version (as libcni hands it over).
func (c *netConf) prevResult(command string) (types.Result, *types.Error) {
	raw, ok := c.raw["prevResult"]
	if !ok || string(bytes.TrimSpace(raw)) == "null" {
		return nil, cniError(types.ErrInvalidNetworkConfig, command+" needs prevResult",
			"masqd-cni is a chained plugin: list it after an interface plugin such as bridge")
	}
	var obj map[string]interface{}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, cniError(types.ErrInvalidNetworkConfig, "prevResult must be a JSON object", err.Error())
	}
	plugin := &types.PluginConf{CNIVersion: c.CNIVersion, RawPrevResult: obj}
	if err := version.ParsePrevResult(plugin); err != nil {
		return nil, cniError(types.ErrInvalidNetworkConfig, "cannot parse prevResult", err.Error())
	}
	return plugin.PrevResult, nil
}

// selectIPs: the addresses (with prefix) of the sandbox interface `ifname`. ips[].interface
// indexes interfaces[]; an IP is ours when its interface has our name and a sandbox (host-side
// interfaces have none). When no IP names an interface, all of them are ours, as the spec's
// IPAM-only results imply. Each address once, in prevResult's order.
func selectIPs(prev types.Result, ifname string) ([]string, *types.Error) {
	result, err := types100.NewResultFromResult(prev)
	if err != nil {
		return nil, cniError(types.ErrInvalidNetworkConfig, "cannot convert prevResult", err.Error())
	}
	anyNamed := false
	for i, ip := range result.IPs {
		if ip == nil || ip.Address.IP == nil || ip.Address.Mask == nil {
			return nil, cniError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("prevResult.ips[%d].address must be an address with prefix, like 10.22.0.5/16", i), "")
		}
		anyNamed = anyNamed || ip.Interface != nil
	}
	selected := []string{}
	seen := map[string]bool{}
	for _, ip := range result.IPs {
		if anyNamed && !isSandboxInterface(result.Interfaces, ip.Interface, ifname) {
			continue
		}
		address := ip.Address.String()
		if !seen[address] {
			seen[address] = true
			selected = append(selected, address)
		}
	}
	return selected, nil
}

func isSandboxInterface(interfaces []*types100.Interface, index *int, ifname string) bool {
	if index == nil || *index < 0 || *index >= len(interfaces) {
		return false
	}
	iface := interfaces[*index]
	return iface != nil && iface.Name == ifname && iface.Sandbox != ""
}

// canonicalIP: an 'address/prefix' as the daemon spells it, for comparing.
func canonicalIP(text string) (string, bool) {
	ip, network, err := net.ParseCIDR(text)
	if err != nil {
		return "", false
	}
	ones, _ := network.Mask.Size()
	return fmt.Sprintf("%s/%d", ip, ones), true
}

type validAttachment struct {
	ContainerID string `json:"container_id"`
	Ifname      string `json:"ifname"`
}

// validAttachments: GC's list of attachments to keep, as the daemon's API spells them. A
// missing list is an error, never read as an empty one: that would remove every attachment
// of the network. Entries masqd could never hold are dropped: they protect nothing, and one of them
// would make the daemon refuse the whole collection.
func (c *netConf) validAttachments() ([]validAttachment, int, *types.Error) {
	var key string
	var raw json.RawMessage
	for _, k := range validAttachmentKeys {
		if r, ok := c.raw[k]; ok {
			key, raw = k, r
			break
		}
	}
	if key == "" {
		return nil, 0, cniError(types.ErrInvalidNetworkConfig, "GC needs cni.dev/valid-attachments", "")
	}
	// null is a list too: libcni writes an empty (nil) Go slice so.
	var entries []json.RawMessage
	if json.Unmarshal(raw, &entries) != nil {
		return nil, 0, cniError(types.ErrInvalidNetworkConfig, key+" must be a list", "")
	}
	valid := []validAttachment{}
	seen := map[validAttachment]bool{}
	dropped := 0
	for i, entry := range entries {
		var fields map[string]json.RawMessage
		var v validAttachment
		if json.Unmarshal(entry, &fields) != nil || fields == nil ||
			!jsonString(fields["containerID"], &v.ContainerID) || !jsonString(fields["ifname"], &v.Ifname) {
			return nil, 0, cniError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("%s[%d] must be an object with containerID and ifname", key, i), "")
		}
		if containerIDProblem(v.ContainerID) != "" || ifnameProblem(v.Ifname) != "" {
			dropped++
			continue
		}
		if !seen[v] {
			seen[v] = true
			valid = append(valid, v)
		}
	}
	return valid, dropped, nil
}

func jsonString(raw json.RawMessage, out *string) bool {
	trimmed := bytes.TrimSpace(raw)
	return len(trimmed) > 0 && trimmed[0] == '"' && json.Unmarshal(trimmed, out) == nil
}
