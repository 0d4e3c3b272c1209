package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The whole plugin as a runtime runs it (skel reads the environment and stdin): the test
// binary re-executes itself as masqd-cni.
func TestMain(m *testing.M) {
	if os.Getenv("MASQD_CNI_TEST_AS_PLUGIN") == "1" {
		os.Exit(run())
	}
	os.Exit(m.Run())
}

type outcome struct {
	rc             int
	stdout, stderr string
}

func (o outcome) object(t *testing.T) map[string]any {
	t.Helper()
	var obj map[string]any
	if err := json.Unmarshal([]byte(o.stdout), &obj); err != nil {
		t.Fatalf("stdout is not one JSON object: %q (stderr %q)", o.stdout, o.stderr)
	}
	return obj
}

func invoke(t *testing.T, env map[string]string, stdin string) outcome {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = []string{"MASQD_CNI_TEST_AS_PLUGIN=1", "CNI_PATH=/opt/cni/bin"}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	rc := 0
	if exit, ok := err.(*exec.ExitError); ok {
		rc = exit.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return outcome{rc, stdout.String(), stderr.String()}
}

func attachmentEnv(command string) map[string]string {
	return map[string]string{"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0"}
}

func TestVersionListsEverySupportedVersion(t *testing.T) {
	out := invoke(t, map[string]string{"CNI_COMMAND": "VERSION"}, "")
	obj := out.object(t)
	if out.rc != 0 || obj["cniVersion"] != "1.1.0" || len(obj["supportedVersions"].([]any)) != 5 {
		t.Errorf("got %+v", out)
	}
}

func TestErrorsAreTheSpecsObjectInTheConfigVersion(t *testing.T) {
	for _, tc := range []struct {
		env          map[string]string
		stdin        string
		code         float64
		version, msg string
	}{
		{map[string]string{}, "{}", 4, "1.1.0", "required env variables [CNI_COMMAND] missing"},
		{attachmentEnv("BOGUS"), `{"cniVersion": "1.0.0", "name": "n"}`, 4, "1.0.0", "unknown CNI_COMMAND: BOGUS"},
		{attachmentEnv("ADD"), `{"cniVersion": "1.0.0", "name": `, 6, "1.1.0", "error unmarshall network config"},
		{attachmentEnv("ADD"), `{"cniVersion": "9.9.9", "name": "n"}`, 1, "1.1.0", "incompatible CNI versions"},
		{attachmentEnv("ADD"), `{"name": "n"}`, 1, "1.1.0", "incompatible CNI versions"},
		{attachmentEnv("CHECK"), `{"cniVersion": "0.3.1", "name": "n"}`, 1, "0.3.1", "config version does not allow CHECK"},
		{attachmentEnv("ADD"), `{"cniVersion": "0.4.0", "name": "n"}`, 7, "0.4.0", "ADD needs prevResult"},
		{attachmentEnv("ADD"), `{"cniVersion": "1.0.0", "name": "` + strings.Repeat("n", 65) + `"}`, 7, "1.0.0", "masqd cannot hold this network name"},
	} {
		out := invoke(t, tc.env, tc.stdin)
		obj := out.object(t)
		if out.rc != 1 || obj["code"] != tc.code || obj["cniVersion"] != tc.version ||
			!strings.HasPrefix(obj["msg"].(string), tc.msg) || len(obj) != 4 {
			t.Errorf("%s: got %+v", tc.stdin, obj)
		}
		if !strings.HasPrefix(out.stderr, "masqd-cni: ") {
			t.Errorf("the error is logged on stderr too: %q", out.stderr)
		}
	}
}

func TestAddPrintsPrevResultInTheRequestedVersion(t *testing.T) {
	path, heads := rawServer(t, func(string) string { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" })
	prev := `{"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/ns"}],
	  "ips": [{"version": "4", "interface": 0, "address": "198.18.1.2/24"}]}`
	conf := `{"cniVersion": "0.4.0", "name": "net1", "socket": "` + path + `", "prevResult": ` + prev + `}`
	out := invoke(t, attachmentEnv("ADD"), conf)
	if out.rc != 0 {
		t.Fatalf("%+v", out)
	}
	obj := out.object(t)
	ip := obj["ips"].([]any)[0].(map[string]any)
	if obj["cniVersion"] != "0.4.0" || ip["version"] != "4" || ip["address"] != "198.18.1.2/24" {
		t.Errorf("result %s", out.stdout)
	}
	if len(*heads) != 1 || !strings.HasPrefix((*heads)[0], "PUT /v1/attachments/net1/c1/eth0 HTTP/1.1") ||
		!strings.HasSuffix((*heads)[0], `{"ips":["198.18.1.2/24"]}`) {
		t.Errorf("requests %q", *heads)
	}
}

func TestDelOfAKeyMasqdCannotHoldIsANoOp(t *testing.T) {
	env := attachmentEnv("DEL")
	env["CNI_IFNAME"] = "eth0~"
	out := invoke(t, env, `{"cniVersion": "1.0.0", "name": "n", "socket": "/nonexistent/masqd.sock"}`)
	if out.rc != 0 || out.stdout != "" || !strings.Contains(out.stderr, "nothing to do") {
		t.Errorf("%+v", out)
	}
}
