package main

import (
	"encoding/json"
	"os"
	"testing"
)

// The vectors the daemon's model tests read too (tests/test_models.py): plugin and daemon
// must accept and refuse exactly the same names.
type nameVectors struct {
	Valid   []string `json:"valid"`
	Invalid []string `json:"invalid"`
}

func loadVectors(t *testing.T) map[string]nameVectors {
	t.Helper()
	data, err := os.ReadFile("../tests/vectors/names.json")
	if err != nil {
		t.Fatal(err)
	}
	var vectors map[string]nameVectors
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	return vectors
}

func TestNamesFollowTheSharedVectors(t *testing.T) {
	checks := map[string]func(string) string{
		"network":      networkProblem,
		"container_id": containerIDProblem,
		"ifname":       ifnameProblem,
	}
	vectors := loadVectors(t)
	for field, problem := range checks {
		v, ok := vectors[field]
		if !ok || len(v.Valid) == 0 || len(v.Invalid) == 0 {
			t.Fatalf("names.json has no valid and invalid %s vectors", field)
		}
		for _, name := range v.Valid {
			if p := problem(name); p != "" {
				t.Errorf("%s %q refused (%s), but the vectors say it is valid", field, name, p)
			}
		}
		for _, name := range v.Invalid {
			if problem(name) == "" {
				t.Errorf("%s %q accepted, but the vectors say it is invalid", field, name)
			}
		}
	}
}

func TestKeyProblemNamesTheFirstBadPart(t *testing.T) {
	if p := keyProblem("net1", "c1", "eth0"); p != "" {
		t.Fatalf("valid key refused: %s", p)
	}
	for _, tc := range []struct{ network, id, ifname, want string }{
		{"-n", "c1", "eth0", `network name "-n" has characters the CNI spec forbids`},
		{"n", string(make([]byte, 129)), "eth0", "container ID is longer than 128 characters"},
		{"n", "c1", `e"x`, "interface name must not contain '/', ':', '\"', '\\', whitespace or control characters"},
		{"n", "c1", "eth0~", "interface name must not end with '~'"},
		{"n", "c1", "e\u202ex", "interface name must not contain bidirectional or zero-width characters (U+202E)"},
		{"n", "c1", "e\xffx", "interface name is not valid UTF-8"},
	} {
		if got := keyProblem(tc.network, tc.id, tc.ifname); got != tc.want {
			t.Errorf("keyProblem(%q, %q, %q) = %q, want %q", tc.network, tc.id, tc.ifname, got, tc.want)
		}
	}
}
