package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A minimal HTTP/1.1 client over the daemon's Unix socket: one request per connection
// (Connection: close). net/http would do, but it adds about 3 MiB to the binary and work at
// every start for features a single local request does not use.

const maxResponseBytes = 64 << 20

// unreachable: no complete HTTP answer from the daemon. retryable means it is not (yet)
// listening or went away mid-request (a restart), so waiting helps.
type unreachable struct {
	reason    string
	retryable bool
}

func (u *unreachable) Error() string { return u.reason }

// reply is the daemon's answer: the status and the body, decoded when it is JSON.
type reply struct {
	status int
	body   any
}

// httpRequest sends one request and reads the answer. Errors are *unreachable, or an
// *os.SyscallError-style error for anything else (which the caller reports as internal).
func httpRequest(socketPath, method, target string, body any, timeout time.Duration) (reply, error) {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return reply{}, err
		}
	}
	var head strings.Builder
	fmt.Fprintf(&head, "%s %s HTTP/1.1\r\nHost: masqd\r\nUser-Agent: masqd-cni\r\nConnection: close\r\n", method, target)
	if body != nil {
		fmt.Fprintf(&head, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(payload))
	}
	head.WriteString("\r\n")

	deadline := time.Now().Add(timeout)
	dialer := net.Dialer{Deadline: deadline}
	conn, err := dialer.Dial("unix", socketPath)
	if err != nil {
		return reply{}, dialError(socketPath, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(deadline)
	if _, err := conn.Write(append([]byte(head.String()), payload...)); err != nil {
		return reply{}, ioError(socketPath, timeout, err)
	}
	status, raw, err := readResponse(bufio.NewReader(conn))
	if err != nil {
		return reply{}, ioError(socketPath, timeout, err)
	}
	out := reply{status: status}
	if len(raw) > 0 {
		if json.Unmarshal(raw, &out.body) != nil {
			out.body = nil
		}
	}
	return out, nil
}

func dialError(socketPath string, err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		// Absent, dead (a stale socket file), or its backlog full: all pass.
		case syscall.ENOENT, syscall.ECONNREFUSED, syscall.EAGAIN:
			return &unreachable{fmt.Sprintf("%s: %s", socketPath, errno.Error()), true}
		}
	}
	if isTimeout(err) {
		return &unreachable{socketPath + ": connect timed out", true}
	}
	return fmt.Errorf("%s: %w", socketPath, unwrapOp(err))
}

func ioError(socketPath string, timeout time.Duration, err error) error {
	var u *unreachable
	if errors.As(err, &u) {
		return u
	}
	if isTimeout(err) {
		return &unreachable{fmt.Sprintf("%s: no answer within %s", socketPath, seconds(timeout.Seconds())), false}
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		// The daemon went away mid-request: it is restarting, so waiting helps.
		return &unreachable{fmt.Sprintf("%s: %s", socketPath, unwrapOp(err)), true}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &unreachable{"connection closed before a complete answer", true}
	}
	return fmt.Errorf("%s: %w", socketPath, unwrapOp(err))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// unwrapOp drops net.OpError's "dial unix /path:" prefix; the caller names the socket.
func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		var sys *os.SyscallError
		if errors.As(op.Err, &sys) {
			return sys.Err
		}
		return op.Err
	}
	return err
}

// readResponse: the status and the body, by Content-Length, chunked encoding, or until close.
func readResponse(r *bufio.Reader) (int, []byte, error) {
	statusLine, err := readLine(r)
	if err != nil {
		return 0, nil, err
	}
	parts := strings.SplitN(statusLine, " ", 3)
	if len(parts) < 2 || !strings.HasPrefix(parts[0], "HTTP/") || !allDigits(parts[1]) {
		shown := statusLine
		if len(shown) > 80 {
			shown = shown[:80]
		}
		return 0, nil, &unreachable{fmt.Sprintf("not an HTTP answer: %q", shown), false}
	}
	status, _ := strconv.Atoi(parts[1])
	headers := map[string]string{}
	for {
		line, err := readLine(r)
		if err != nil {
			return 0, nil, err
		}
		if line == "" {
			break
		}
		name, value, _ := strings.Cut(line, ":")
		headers[strings.ToLower(strings.TrimSpace(name))] = strings.TrimSpace(value)
	}
	if strings.Contains(strings.ToLower(headers["transfer-encoding"]), "chunked") {
		body, err := readChunked(r)
		return status, body, err
	}
	if length, ok := headers["content-length"]; ok && allDigits(length) {
		n, err := strconv.Atoi(length)
		if err != nil || n > maxResponseBytes {
			return 0, nil, &unreachable{"answer too large", false}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return 0, nil, err
		}
		return status, body, nil
	}
	// No length: the body ends when the server closes.
	body, err := io.ReadAll(io.LimitReader(r, maxResponseBytes+1))
	if err != nil {
		return 0, nil, err
	}
	if len(body) > maxResponseBytes {
		return 0, nil, &unreachable{"answer too large", false}
	}
	return status, body, nil
}

func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return "", &unreachable{"answer has an over-long header line", false}
	}
	if err != nil {
		return "", err
	}
	return string(bytes.TrimRight(line, "\r\n")), nil
}

func readChunked(r *bufio.Reader) ([]byte, error) {
	var out []byte
	for {
		line, err := readLine(r)
		if err != nil {
			return nil, err
		}
		sizeText, _, _ := strings.Cut(line, ";") // chunk extensions are ignored
		size, err := strconv.ParseInt(strings.TrimSpace(sizeText), 16, 64)
		if err != nil || size < 0 {
			return nil, &unreachable{"malformed chunked answer", false}
		}
		if size == 0 {
			return out, nil
		}
		if int64(len(out))+size > maxResponseBytes {
			return nil, &unreachable{"answer too large", false}
		}
		chunk := make([]byte, size+2) // the data and its CRLF
		if _, err := io.ReadFull(r, chunk); err != nil {
			return nil, err
		}
		out = append(out, chunk[:size]...)
	}
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// quote percent-encodes one URL path segment: interface names may hold almost any character.
func quote(segment string) string {
	var b strings.Builder
	for _, c := range []byte(segment) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// seconds formats a duration in seconds as Python's %g does ("0.4", "10").
func seconds(s float64) string {
	return strconv.FormatFloat(s, 'g', -1, 64) + "s"
}
