package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

// How long one request may take once the daemon accepted the connection. It answers a change
// once the kernel holds it, which takes milliseconds; a daemon that takes this long is stuck,
// and the runtime hears "try again later".
const (
	requestTimeout  = 30 * time.Second
	delTimeout      = 3 * time.Second // DEL does not wait: an answer missing this long is spooled
	statusTimeout   = 3 * time.Second
	retryFirstDelay = 50 * time.Millisecond
	retryMaxDelay   = 500 * time.Millisecond
)

// plugin holds what every command needs besides skel's arguments; tests replace the clock
// and the streams.
type plugin struct {
	stdout     io.Writer
	stderr     io.Writer
	now        func() time.Time
	sleep      func(time.Duration)
	delTimeout time.Duration
}

// invocation: one command on one attachment (or network, for GC and STATUS).
type invocation struct {
	*plugin
	command string
	args    *skel.CmdArgs
	conf    *netConf
}

func (inv *invocation) key() string {
	return inv.conf.Name + "/" + inv.args.ContainerID + "/" + inv.args.IfName
}

func (inv *invocation) logf(format string, a ...any) {
	label := inv.command + " " + inv.conf.Name
	if inv.args.ContainerID != "" {
		label = inv.command + " " + inv.key()
	}
	fmt.Fprintf(inv.stderr, "masqd-cni: %s: %s\n", label, fmt.Sprintf(format, a...))
}

func (inv *invocation) attachmentPath() string {
	return "/v1/attachments/" + quote(inv.conf.Name) + "/" + quote(inv.args.ContainerID) + "/" + quote(inv.args.IfName)
}

func (p *plugin) funcs() skel.CNIFuncs {
	wrap := func(command string, run func(*invocation) error) func(*skel.CmdArgs) error {
		return func(args *skel.CmdArgs) error {
			conf, err := parseConf(args.StdinData)
			if err != nil {
				return err
			}
			return run(&invocation{plugin: p, command: command, args: args, conf: conf})
		}
	}
	return skel.CNIFuncs{
		Add:    wrap("ADD", cmdAdd),
		Del:    wrap("DEL", cmdDel),
		Check:  wrap("CHECK", cmdCheck),
		GC:     wrap("GC", cmdGC),
		Status: wrap("STATUS", cmdStatus),
	}
}

// requireHoldableKey: the stricter rules of masqd's API, after skel's CNI ones.
func (inv *invocation) requireHoldableKey() error {
	if p := networkProblem(inv.conf.Name); p != "" {
		return cniError(types.ErrInvalidNetworkConfig, "masqd cannot hold this network name: "+p, inv.conf.Name)
	}
	if p := containerIDProblem(inv.args.ContainerID); p != "" {
		return cniError(types.ErrInvalidEnvironmentVariables, "masqd cannot hold this container ID: "+p, inv.args.ContainerID)
	}
	if p := ifnameProblem(inv.args.IfName); p != "" {
		return cniError(types.ErrInvalidEnvironmentVariables, "masqd cannot hold this interface name: "+p, fmt.Sprintf("%q", inv.args.IfName))
	}
	return nil
}

func cmdAdd(inv *invocation) error {
	if err := inv.requireHoldableKey(); err != nil {
		return err
	}
	prev, cerr := inv.conf.prevResult("ADD")
	if cerr != nil {
		return cerr
	}
	ips, cerr := selectIPs(prev, inv.args.IfName)
	if cerr != nil {
		return cerr
	}
	if len(ips) > 0 {
		inv.cancelSpooledDelete()
		answer, err := inv.callWithWait("PUT", inv.attachmentPath(), map[string]any{"ips": ips})
		if err != nil {
			return err
		}
		if answer.status < 200 || answer.status >= 300 {
			return refused(answer, "set up "+inv.key())
		}
		inv.logf("masquerading %s", strings.Join(ips, ", "))
	} else {
		inv.logf("prevResult has no IP for %s: nothing to masquerade", inv.args.IfName)
	}
	// A chained plugin passes the result on, in the version the runtime asked for.
	out, err := prev.GetAsVersion(inv.conf.CNIVersion)
	if err != nil {
		return cniError(types.ErrInvalidNetworkConfig, "cannot convert prevResult", err.Error())
	}
	return out.PrintTo(inv.stdout)
}

func cmdCheck(inv *invocation) error {
	if err := inv.requireHoldableKey(); err != nil {
		return err
	}
	prev, cerr := inv.conf.prevResult("CHECK")
	if cerr != nil {
		return cerr
	}
	ips, cerr := selectIPs(prev, inv.args.IfName)
	if cerr != nil {
		return cerr
	}
	expected, bad := canonicalSet(ips)
	if bad != "" {
		return cniError(types.ErrInvalidNetworkConfig, "prevResult holds an invalid address", bad)
	}
	answer, err := inv.callWithWait("GET", inv.attachmentPath(), nil)
	if err != nil {
		return err
	}
	if answer.status == 404 {
		if len(expected) > 0 {
			return cniError(types.ErrInternal, "masqd holds no attachment "+inv.key(),
				"expected masquerade for "+listText(expected))
		}
		return nil
	}
	if answer.status != 200 {
		return refused(answer, "look up "+inv.key())
	}
	body, _ := answer.body.(map[string]any)
	list, isList := body["ips"].([]any)
	heldIPs := make([]string, 0, len(list))
	for _, item := range list {
		if s, ok := item.(string); ok {
			heldIPs = append(heldIPs, s)
		}
	}
	if !isList || len(heldIPs) != len(list) {
		raw, _ := json.Marshal(answer.body)
		return cniError(types.ErrInternal, "unexpected answer from masqd", string(raw))
	}
	held, bad := canonicalSet(heldIPs)
	if bad != "" {
		return cniError(types.ErrInternal, "masqd's answer holds an invalid address", bad)
	}
	if listText(held) != listText(expected) {
		return cniError(types.ErrInternal, "masqd holds other IPs for "+inv.key()+" than prevResult says",
			fmt.Sprintf("masqd holds %s, prevResult has %s", listText(held), listText(expected)))
	}
	return nil
}

func canonicalSet(ips []string) (map[string]bool, string) {
	out := map[string]bool{}
	for _, ip := range ips {
		c, ok := canonicalIP(ip)
		if !ok {
			return nil, ip
		}
		out[c] = true
	}
	return out, ""
}

func listText(set map[string]bool) string {
	items := make([]string, 0, len(set))
	for ip := range set {
		items = append(items, ip)
	}
	sort.Strings(items)
	return "[" + strings.Join(items, ", ") + "]"
}

func cmdDel(inv *invocation) error {
	if p := keyProblem(inv.conf.Name, inv.args.ContainerID, inv.args.IfName); p != "" {
		// The daemon never accepts such a key, so it holds nothing to delete.
		inv.logf("masqd cannot hold this attachment (%s); nothing to do", p)
		return nil
	}
	answer, err := httpRequest(inv.conf.Socket, "DELETE", inv.attachmentPath(), nil, inv.delTimeout)
	var away *unreachable
	switch {
	case errors.As(err, &away):
		return inv.spool(away.reason)
	case err != nil:
		return cniError(types.ErrInternal, "cannot talk to masqd at "+inv.conf.Socket, err.Error())
	case answer.status >= 200 && answer.status < 300, answer.status == 404:
		return nil
	case answer.status >= 500:
		return inv.spool(fmt.Sprintf("masqd answered %d: %s", answer.status, errorText(answer)))
	case answer.status == 400, answer.status == 422:
		inv.logf("masqd cannot hold %s: %s; nothing to do", inv.key(), errorText(answer))
		return nil
	}
	return refused(answer, "delete "+inv.key())
}

func cmdGC(inv *invocation) error {
	if p := networkProblem(inv.conf.Name); p != "" {
		return cniError(types.ErrInvalidNetworkConfig, "masqd cannot hold this network name: "+p, inv.conf.Name)
	}
	valid, dropped, cerr := inv.conf.validAttachments()
	if cerr != nil {
		return cerr
	}
	answer, err := inv.callWithWait("POST", "/v1/networks/"+quote(inv.conf.Name)+"/gc",
		map[string]any{"valid_attachments": valid})
	if err != nil {
		return err
	}
	if answer.status < 200 || answer.status >= 300 {
		return refused(answer, "garbage-collect network "+inv.conf.Name)
	}
	removed := "?"
	if body, ok := answer.body.(map[string]any); ok {
		if list, ok := body["removed"].([]any); ok {
			removed = fmt.Sprint(len(list))
		}
	}
	inv.logf("%d valid attachments (%d dropped: names masqd cannot hold), %s removed", len(valid), dropped, removed)
	return nil
}

func cmdStatus(inv *invocation) error {
	answer, err := httpRequest(inv.conf.Socket, "GET", "/readyz", nil, statusTimeout)
	var away *unreachable
	if errors.As(err, &away) {
		return cniError(errPluginNotAvailable, "masqd is not available", away.reason)
	}
	if err != nil {
		return cniError(errPluginNotAvailable, "masqd is not available", err.Error())
	}
	if answer.status != 200 {
		return cniError(errPluginNotAvailable, "masqd is not ready", errorText(answer))
	}
	return nil
}

// callWithWait: a request that waits up to daemonWaitSeconds for a daemon that is absent or
// not ready (no socket, connection refused, HTTP 503), retrying with backoff; then code 11
// ("try again later"), which runtimes retry.
func (inv *invocation) callWithWait(method, target string, body any) (reply, error) {
	wait := time.Duration(inv.conf.DaemonWait * float64(time.Second))
	deadline := inv.now().Add(wait)
	delay := retryFirstDelay
	for {
		answer, err := httpRequest(inv.conf.Socket, method, target, body, requestTimeout)
		var reason string
		var away *unreachable
		switch {
		case errors.As(err, &away):
			if !away.retryable {
				return reply{}, cniError(types.ErrTryAgainLater, "masqd did not answer", away.reason)
			}
			reason = away.reason
		case err != nil:
			return reply{}, cniError(types.ErrInternal, "cannot talk to masqd at "+inv.conf.Socket, err.Error())
		case answer.status != 503:
			return answer, nil
		default:
			reason = "masqd is not ready: " + errorText(answer)
		}
		remaining := deadline.Sub(inv.now())
		if remaining <= 0 {
			return reply{}, cniError(types.ErrTryAgainLater,
				fmt.Sprintf("masqd is not available after waiting %s; try again later", seconds(inv.conf.DaemonWait)), reason)
		}
		inv.sleep(min(delay, remaining))
		delay = min(delay*2, retryMaxDelay)
	}
}

func errorText(answer reply) string {
	if body, ok := answer.body.(map[string]any); ok {
		if text, ok := body["error"].(string); ok {
			if details, ok := body["details"]; ok && details != nil {
				raw, _ := json.Marshal(details)
				return text + " " + string(raw)
			}
			return text
		}
	}
	return fmt.Sprintf("HTTP %d", answer.status)
}

// refused: the CNI error for an answer that is neither success nor "not ready".
func refused(answer reply, what string) error {
	text := errorText(answer)
	switch status := answer.status; {
	case status == 400, status == 409, status == 413, status == 422:
		return cniError(types.ErrInvalidNetworkConfig, "masqd rejected "+what, text)
	case status >= 500:
		return cniError(types.ErrTryAgainLater, "masqd failed to "+what+"; try again later", text)
	case status == 403:
		return cniError(types.ErrInternal, "masqd refused this client (peer credentials)", text)
	}
	return cniError(types.ErrInternal, "unexpected answer from masqd to "+what, text)
}

func (inv *invocation) spool(reason string) error {
	dir := spoolDirFor(inv.conf.Socket)
	path, err := spoolDelete(dir, inv.conf.Name, inv.args.ContainerID, inv.args.IfName, inv.now())
	if errors.Is(err, errSpoolFull) {
		return cniError(types.ErrTryAgainLater, "masqd is down and the DEL spool is full", err.Error())
	}
	if err != nil {
		return cniError(types.ErrTryAgainLater, "masqd is down and the DEL could not be spooled", err.Error())
	}
	inv.logf("masqd unreachable (%s); DEL spooled to %s", reason, path)
	return nil
}

func (inv *invocation) cancelSpooledDelete() {
	removed, err := cancelDelete(spoolDirFor(inv.conf.Socket), inv.conf.Name, inv.args.ContainerID, inv.args.IfName)
	if err != nil {
		inv.logf("cannot drop a spooled DEL of this attachment: %v", err)
	} else if removed {
		inv.logf("dropped a spooled DEL of this attachment")
	}
}
