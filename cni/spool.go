package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unicode/utf16"
)

// The DEL spool, writing side. The daemon reads it (masqd/spool.py); docs/cni.md describes
// the format, which both sides must keep:
//
//	<dirname(socket)>/spool/del-<first 32 hex digits of sha256(key)>.json
//	{"version": 1, "network": ..., "container_id": ..., "ifname": ..., "spooled_at": <unix time>}
//
// where key is the JSON text of [network, container_id, ifname] exactly as Python's
// json.dumps writes it (", " between items, non-ASCII as \uXXXX).
const (
	spoolDirName = "spool"
	spoolFormat  = 1
	entryPrefix  = "del-"
	entrySuffix  = ".json"
	tempPrefix   = ".tmp-"

	maxEntryBytes = 4096
)

// maxSpoolEntries bounds the spool (a variable so that a test can fill it quickly).
var maxSpoolEntries = 4096

var errSpoolFull = errors.New("spool full")

func spoolDirFor(socketPath string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(socketPath)), spoolDirName)
}

// entryName: the same attachment key always gives the same file, so a repeated DEL rewrites
// one entry instead of growing the spool.
func entryName(network, containerID, ifname string) string {
	key := "[" + pyJSONString(network) + ", " + pyJSONString(containerID) + ", " + pyJSONString(ifname) + "]"
	sum := sha256.Sum256([]byte(key))
	return entryPrefix + hex.EncodeToString(sum[:])[:32] + entrySuffix
}

// pyJSONString is a JSON string as Python's json.dumps (ensure_ascii) writes it.
func pyJSONString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\b':
			b.WriteString(`\b`)
		case r == '\f':
			b.WriteString(`\f`)
		case r < 0x20 || r > 0x7e && r <= 0xffff:
			fmt.Fprintf(&b, `\u%04x`, r)
		case r > 0xffff:
			hi, lo := utf16.EncodeRune(r)
			fmt.Fprintf(&b, `\u%04x\u%04x`, hi, lo)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

type spoolRecord struct {
	Version     int     `json:"version"`
	Network     string  `json:"network"`
	ContainerID string  `json:"container_id"`
	Ifname      string  `json:"ifname"`
	SpooledAt   float64 `json:"spooled_at"`
}

// spoolDelete records a DEL for the daemon, atomically (temporary file, fsync, rename), and
// returns the entry's path. A full spool refuses a new entry (errSpoolFull) rather than
// evicting an older one, which would forget a DEL silently.
func spoolDelete(dir, network, containerID, ifname string, now time.Time) (string, error) {
	record := spoolRecord{spoolFormat, network, containerID, ifname, float64(now.UnixNano()) / 1e9}
	data, err := json.Marshal(record)
	if err != nil {
		return "", err
	}
	if len(data) > maxEntryBytes {
		return "", fmt.Errorf("spool entry would be %d bytes, more than %d", len(data), maxEntryBytes)
	}
	if info, err := os.Stat(dir); err != nil || !info.IsDir() {
		// The daemon never ran here yet: make its socket directory as it would (0750).
		if err := os.MkdirAll(filepath.Dir(dir), 0o750); err != nil {
			return "", err
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return "", err
		}
	}
	name := entryName(network, containerID, ifname)
	path := filepath.Join(dir, name)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		count, err := countEntries(dir)
		if err != nil {
			return "", err
		}
		if count >= maxSpoolEntries {
			return "", fmt.Errorf("%w: %s already holds %d undelivered deletes", errSpoolFull, dir, maxSpoolEntries)
		}
	}
	tmp := filepath.Join(dir, fmt.Sprintf("%s%s.%d", tempPrefix, name, os.Getpid()))
	if err := writeSynced(tmp, data); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	syncDir(dir)
	return path, nil
}

func writeSynced(path string, data []byte) error {
	fd, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_TRUNC|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes the rename durable on a disk-backed directory (a no-op cost on tmpfs).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

func countEntries(dir string) (int, error) {
	d, err := os.Open(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	defer d.Close()
	count := 0
	for {
		names, err := d.Readdirnames(1024)
		for _, n := range names {
			if strings.HasPrefix(n, entryPrefix) && strings.HasSuffix(n, entrySuffix) {
				count++
			}
		}
		if err == io.EOF {
			return count, nil
		}
		if err != nil {
			return 0, err
		}
	}
}

// cancelDelete drops a spooled DEL of this key, if any, because the attachment is being set
// up again: applied after the new ADD, the old DEL would tear the fresh attachment down.
func cancelDelete(dir, network, containerID, ifname string) (bool, error) {
	d, err := os.Open(dir)
	if err != nil {
		return false, nil // no spool at all: the usual case
	}
	names, _ := d.Readdirnames(1)
	_ = d.Close()
	if len(names) == 0 {
		return false, nil // an empty spool, the other usual case: no hashing needed
	}
	err = os.Remove(filepath.Join(dir, entryName(network, containerID, ifname)))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
