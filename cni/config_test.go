package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

const bridgeResult = `{
  "cniVersion": "1.0.0",
  "interfaces": [
    {"name": "cni0", "mac": "aa:2e:69:56:05:8a"},
    {"name": "veth1234", "mac": "6a:33:5e:08:78:91"},
    {"name": "eth0", "mac": "aa:2a:ca:ff:59:df", "sandbox": "/var/run/netns/c1"}
  ],
  "ips": [
    {"interface": 2, "address": "198.18.10.2/24", "gateway": "198.18.10.1"},
    {"interface": 2, "address": "2001:db8:10::2/64", "gateway": "2001:db8:10::1"},
    {"interface": 0, "address": "198.18.10.1/24"}
  ]
}`

func mustConf(t *testing.T, text string) *netConf {
	t.Helper()
	conf, err := parseConf([]byte(text))
	if err != nil {
		t.Fatalf("parseConf(%s): %v", text, err)
	}
	return conf
}

func withPrev(version, prev string) string {
	return `{"cniVersion": "` + version + `", "name": "net1", "prevResult": ` + prev + `}`
}

func ips(t *testing.T, version, prev, ifname string) []string {
	t.Helper()
	result, cerr := mustConf(t, withPrev(version, prev)).prevResult("ADD")
	if cerr != nil {
		t.Fatalf("prevResult: %v", cerr)
	}
	selected, cerr := selectIPs(result, ifname)
	if cerr != nil {
		t.Fatalf("selectIPs: %v", cerr)
	}
	return selected
}

func TestSelectIPsTakesOnlyTheSandboxInterfaceOfThatName(t *testing.T) {
	got := ips(t, "1.0.0", bridgeResult, "eth0")
	if want := []string{"198.18.10.2/24", "2001:db8:10::2/64"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if got := ips(t, "1.0.0", bridgeResult, "cni0"); len(got) != 0 {
		t.Errorf("a host-side interface (no sandbox) gave %v", got)
	}
	twoNamed := `{"interfaces": [{"name": "eth0"}, {"name": "eth0", "sandbox": "/ns"}],
	  "ips": [{"interface": 0, "address": "198.18.1.1/24"}, {"interface": 1, "address": "198.18.1.2/24"},
	          {"interface": 7, "address": "198.18.3.2/24"}]}`
	if got := ips(t, "1.1.0", twoNamed, "eth0"); !reflect.DeepEqual(got, []string{"198.18.1.2/24"}) {
		t.Errorf("got %v", got)
	}
}

func TestSelectIPsTakesAllWhenNoneNamesAnInterfaceAndDropsRepeats(t *testing.T) {
	prev := `{"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "198.18.1.2/24"},
	  {"version": "6", "address": "2001:DB8:1:0::2/64"}, {"version": "4", "address": "198.18.1.2/24"}]}`
	got := ips(t, "0.4.0", prev, "eth0")
	if want := []string{"198.18.1.2/24", "2001:db8:1::2/64"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestMalformedPrevResultIsCode7(t *testing.T) {
	for _, prev := range []string{
		`{"ips": {"address": "198.18.1.2/24"}}`,
		`{"ips": ["198.18.1.2/24"]}`,
		`{"ips": [{"interface": 0}]}`,
		`{"ips": [{"address": 5}]}`,
		`{"ips": [{"address": "198.18.1.2"}]}`,
		`{"interfaces": "eth0", "ips": []}`,
		`"a string"`,
	} {
		result, cerr := mustConf(t, withPrev("1.0.0", prev)).prevResult("ADD")
		if cerr == nil {
			_, cerr = selectIPs(result, "eth0")
		}
		if cerr == nil || cerr.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("prevResult %s: got %v, want code 7", prev, cerr)
		}
	}
	_, cerr := mustConf(t, `{"cniVersion": "1.0.0", "name": "n"}`).prevResult("ADD")
	if cerr == nil || cerr.Msg != "ADD needs prevResult" || !strings.Contains(cerr.Details, "chained plugin") {
		t.Errorf("no prevResult: got %v", cerr)
	}
}

func TestPluginKeysAreCheckedWithCode7(t *testing.T) {
	conf := mustConf(t, `{"name": "n", "socket": "/run/x/masqd.sock", "daemonWaitSeconds": 2.5}`)
	if conf.Socket != "/run/x/masqd.sock" || conf.DaemonWait != 2.5 {
		t.Errorf("got %+v", conf)
	}
	conf = mustConf(t, `{"name": "n"}`)
	if conf.Socket != defaultSocket || conf.DaemonWait != defaultDaemonWait {
		t.Errorf("defaults: got %+v", conf)
	}
	for _, bad := range []string{
		`"socket": "relative/masqd.sock"`, `"socket": 7`, `"socket": null`,
		`"daemonWaitSeconds": "ten"`, `"daemonWaitSeconds": -1`, `"daemonWaitSeconds": true`,
		`"daemonWaitSeconds": 1e9`, `"daemonWaitSeconds": null`,
	} {
		_, cerr := parseConf([]byte(`{"name": "n", ` + bad + `}`))
		if cerr == nil || cerr.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: got %v, want code 7", bad, cerr)
		}
	}
}

func TestValidAttachmentsUseBothKeysAndDropWhatMasqdCannotHold(t *testing.T) {
	entries := `[{"containerID": "c1", "ifname": "eth0", "extra": 1}, {"containerID": "c1", "ifname": "eth0"},
	  {"containerID": "bad id", "ifname": "eth0"}, {"containerID": "c2", "ifname": "e/th"},
	  {"containerID": "c4", "ifname": "e\"x"}, {"containerID": "c5", "ifname": "eth0~"},
	  {"containerID": "c3", "ifname": "net1"}]`
	want := []validAttachment{{"c1", "eth0"}, {"c3", "net1"}}
	for _, key := range validAttachmentKeys {
		valid, dropped, cerr := mustConf(t, `{"name": "n", "`+key+`": `+entries+`}`).validAttachments()
		if cerr != nil || !reflect.DeepEqual(valid, want) || dropped != 4 {
			t.Errorf("%s: got %v, %d dropped, %v", key, valid, dropped, cerr)
		}
	}
	for _, empty := range []string{"[]", "null"} { // null: how libcni writes an empty Go slice
		valid, _, cerr := mustConf(t, `{"name": "n", "cni.dev/valid-attachments": `+empty+`}`).validAttachments()
		if data, _ := json.Marshal(valid); cerr != nil || string(data) != "[]" {
			t.Errorf("%s must be an empty list: %s %v", empty, data, cerr)
		}
	}
}

func TestGCWithoutAUsableListIsCode7NeverAnEmptyList(t *testing.T) {
	for _, conf := range []string{
		`{"name": "n"}`,
		`{"name": "n", "cni.dev/valid-attachments": {}}`,
		`{"name": "n", "cni.dev/valid-attachments": [{"containerID": "c1"}]}`,
		`{"name": "n", "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": 5}]}`,
		`{"name": "n", "cni.dev/valid-attachments": ["c1"]}`,
	} {
		_, _, cerr := mustConf(t, conf).validAttachments()
		if cerr == nil || cerr.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: got %v, want code 7", conf, cerr)
		}
	}
}

func TestCanonicalIPSpellsAddressesAsTheDaemonDoes(t *testing.T) {
	for in, want := range map[string]string{
		"198.18.10.2/24":           "198.18.10.2/24",
		"2001:DB8:10:0::2/64":      "2001:db8:10::2/64",
		"2001:db8:0:0:0:0:0:1/128": "2001:db8::1/128",
	} {
		if got, ok := canonicalIP(in); !ok || got != want {
			t.Errorf("canonicalIP(%q) = %q, want %q", in, got, want)
		}
	}
	if _, ok := canonicalIP("198.18.10.2"); ok {
		t.Error("an address without prefix was accepted")
	}
}
