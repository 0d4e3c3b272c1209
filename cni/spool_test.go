package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The entry names Python's masqd.spool.entry_name gives for these keys (the daemon checks
// that a file's name matches its key, so they must agree byte for byte).
func TestEntryNamesMatchThePythonDaemons(t *testing.T) {
	for _, tc := range []struct{ network, id, ifname, want string }{
		{"n", "c1", "eth0", "del-29aedf9bda2c166a5bd3d85b447984ec.json"},
		{"net1", "ctr1", "éth0", "del-a18c08ad535e31211a87022f8c6fe28f.json"},
		{"a.b", "c", "d", "del-eddc50e79f97948af86f594a7fd746e7.json"},
		{"a", "b.c", "d", "del-87dcf6678162fc407f4e69261c4f24d0.json"},
		{"n", "c", "😀x", "del-074b8ed4744033a165fa467dd6fcc639.json"},
	} {
		if got := entryName(tc.network, tc.id, tc.ifname); got != tc.want {
			t.Errorf("entryName(%q, %q, %q) = %s, want %s", tc.network, tc.id, tc.ifname, got, tc.want)
		}
	}
}

func TestSpooledDeleteIsOnePrivateFileInTheDocumentedFormat(t *testing.T) {
	run := filepath.Join(t.TempDir(), "run")
	dir := filepath.Join(run, "spool")
	first, err := spoolDelete(dir, "net1", "ctr1", "eth0", time.Unix(100, 0))
	if err != nil {
		t.Fatal(err)
	}
	second, err := spoolDelete(dir, "net1", "ctr1", "eth0", time.Unix(200, 500_000_000))
	if err != nil || second != first {
		t.Fatalf("a repeated DEL must rewrite the same entry: %s %s %v", first, second, err)
	}
	names, _ := os.ReadDir(dir)
	if len(names) != 1 || names[0].Name() != entryName("net1", "ctr1", "eth0") {
		t.Fatalf("spool holds %v", names) // no temporary file left behind either
	}
	var record map[string]any
	data, _ := os.ReadFile(first)
	if err := json.Unmarshal(data, &record); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"version": 1.0, "network": "net1", "container_id": "ctr1", "ifname": "eth0", "spooled_at": 200.5}
	if len(record) != len(want) {
		t.Errorf("record %v", record)
	}
	for k, v := range want {
		if record[k] != v {
			t.Errorf("record[%s] = %v, want %v", k, record[k], v)
		}
	}
	for path, mode := range map[string]os.FileMode{run: 0o750, dir: 0o700, first: 0o600} {
		if info, err := os.Stat(path); err != nil || info.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v (%v)", path, info.Mode().Perm(), mode, err)
		}
	}
}

func TestAFullSpoolRefusesNewEntriesButTakesRepeats(t *testing.T) {
	defer func(limit int) { maxSpoolEntries = limit }(maxSpoolEntries)
	maxSpoolEntries = 3
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "foreign-file"), nil, 0o600); err != nil {
		t.Fatal(err) // not an entry: does not count
	}
	for _, ifname := range []string{"aaa", "bbb", "ccc"} {
		if _, err := spoolDelete(dir, "n", "filler", ifname, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := spoolDelete(dir, "n", "one-more", "eth0", time.Now()); !errors.Is(err, errSpoolFull) {
		t.Fatalf("got %v, want errSpoolFull", err)
	}
	if _, err := spoolDelete(dir, "n", "filler", "aaa", time.Now()); err != nil {
		t.Fatalf("a repeat of a spooled key must be taken: %v", err)
	}
}

func TestCancelDropsOnlyThatKeyAndIsIdempotent(t *testing.T) {
	dir := t.TempDir()
	if removed, err := cancelDelete(filepath.Join(dir, "absent"), "n", "c", "eth0"); removed || err != nil {
		t.Errorf("absent spool: %v %v", removed, err)
	}
	for _, id := range []string{"c", "other"} {
		if _, err := spoolDelete(dir, "n", id, "eth0", time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if removed, err := cancelDelete(dir, "n", "c", "eth0"); !removed || err != nil {
		t.Errorf("first cancel: %v %v", removed, err)
	}
	if removed, err := cancelDelete(dir, "n", "c", "eth0"); removed || err != nil {
		t.Errorf("second cancel: %v %v", removed, err)
	}
	if names, _ := os.ReadDir(dir); len(names) != 1 || names[0].Name() != entryName("n", "other", "eth0") {
		t.Errorf("left %v", names)
	}
}

func TestSpoolSitsBesideTheSocket(t *testing.T) {
	for sock, want := range map[string]string{"/run/masqd/masqd.sock": "/run/masqd/spool", "/tmp/x/y.sock": "/tmp/x/spool"} {
		if got := spoolDirFor(sock); got != want {
			t.Errorf("spoolDirFor(%s) = %s, want %s", sock, got, want)
		}
	}
}
