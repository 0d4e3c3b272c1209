package main

import (
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"
)

// The attachment-name rules of masqd's API (masqd/models.py). The plugin applies them itself
// so that it never sends the daemon a key the daemon refuses: an ADD fails with a clear error,
// a DEL of such a key is a no-op (the daemon cannot hold it), and GC drops such entries
// instead of having the whole collection refused. tests/vectors/names.json holds the cases
// both sides are tested against.
const (
	maxNetworkName = 64
	maxContainerID = 128
	maxIfnameBytes = 15 // IFNAMSIZ - 1
)

// The CNI spec's pattern for network names and container IDs.
var cniName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]*$`)

func networkProblem(name string) string {
	return cniNameProblem("network name", name, maxNetworkName)
}

func containerIDProblem(id string) string {
	return cniNameProblem("container ID", id, maxContainerID)
}

func cniNameProblem(what, value string, limit int) string {
	switch {
	case value == "":
		return what + " is empty"
	case len(value) > limit:
		return fmt.Sprintf("%s is longer than %d characters", what, limit)
	case !cniName.MatchString(value):
		return fmt.Sprintf("%s %q has characters the CNI spec forbids", what, value)
	}
	return ""
}

// ifnameProblem says why masqd cannot hold `name` as an interface name, or "" when it can:
// the kernel's rules (1 to 15 bytes, not . or .., no / : or whitespace), plus no NUL or other
// control character, quote or backslash (the name lands in nftables element comments), no
// bidirectional-override or zero-width character (they make a listing lie about the name),
// and no trailing ~ (the daemon refuses it: masqd/models.py).
func ifnameProblem(name string) string {
	size := len(name)
	if size < 1 || size > maxIfnameBytes {
		return fmt.Sprintf("interface name must be 1 to %d bytes, got %d", maxIfnameBytes, size)
	}
	if name == "." || name == ".." {
		return "interface name must not be '.' or '..'"
	}
	if !utf8.ValidString(name) {
		return "interface name is not valid UTF-8"
	}
	for _, r := range name {
		if forbiddenInIfname(r) {
			return "interface name must not contain '/', ':', '\"', '\\', whitespace or control characters"
		}
		if invisible(r) {
			return fmt.Sprintf("interface name must not contain bidirectional or zero-width characters (U+%04X)", r)
		}
	}
	if strings.HasSuffix(name, "~") {
		return "interface name must not end with '~'"
	}
	return ""
}

func forbiddenInIfname(r rune) bool {
	return r == '/' || r == ':' || r == '"' || r == '\\' || r < 0x20 || r == 0x7f || isPythonSpace(r)
}

// isPythonSpace is Python's str.isspace(), which the daemon's rule (regex \s) uses; Go's
// unicode.IsSpace differs only in U+001C to U+001F, which are control characters anyway.
func isPythonSpace(r rune) bool {
	switch {
	case r == ' ', r >= '\t' && r <= '\r', r >= 0x1c && r <= 0x1f:
		return true
	case r == 0x85, r == 0xa0, r == 0x1680, r >= 0x2000 && r <= 0x200a:
		return true
	case r == 0x2028, r == 0x2029, r == 0x202f, r == 0x205f, r == 0x3000:
		return true
	}
	return false
}

// invisible: bidirectional controls and zero-width characters.
func invisible(r rune) bool {
	switch {
	case r == 0x061c, r >= 0x200b && r <= 0x200f, r >= 0x202a && r <= 0x202e:
		return true
	case r >= 0x2060 && r <= 0x2064, r >= 0x2066 && r <= 0x2069, r == 0xfeff:
		return true
	}
	return false
}

// keyProblem: why (network, container ID, ifname) is not an attachment key masqd can hold.
func keyProblem(network, containerID, ifname string) string {
	if p := networkProblem(network); p != "" {
		return p
	}
	if p := containerIDProblem(containerID); p != "" {
		return p
	}
	return ifnameProblem(ifname)
}
