package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// rawServer answers every connection on a Unix socket with `answer`, after reading the
// request head; it records the heads.
func rawServer(t *testing.T, answer func(head string) string) (string, *[]string) {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "mqcni-go-") // AF_UNIX paths are short: not t.TempDir()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "masqd.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	heads := &[]string{}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			r := bufio.NewReader(conn)
			var head strings.Builder
			length := 0
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					break
				}
				head.WriteString(line)
				fmt.Sscanf(strings.ToLower(line), "content-length: %d", &length)
				if line == "\r\n" {
					break
				}
			}
			body := make([]byte, length)
			_, _ = io.ReadFull(r, body)
			*heads = append(*heads, head.String()+string(body))
			_, _ = conn.Write([]byte(answer(head.String())))
			conn.Close()
		}
	}()
	return path, heads
}

const held = `{"ips": ["198.18.10.2/24"]}`

func chunked(body string, size int) string {
	var b strings.Builder
	for i := 0; i < len(body); i += size {
		end := min(i+size, len(body))
		ext := ""
		if i == 0 {
			ext = ";x=y" // an extension, which a client must ignore
		}
		fmt.Fprintf(&b, "%x%s\r\n%s\r\n", end-i, ext, body[i:end])
	}
	return b.String() + "0\r\n\r\n"
}

func TestClientReadsSizedChunkedAndCloseDelimitedAnswers(t *testing.T) {
	for name, raw := range map[string]string{
		"content-length": fmt.Sprintf("HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n%strailing garbage", len(held), held),
		"chunked":        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(held, 7),
		"close":          "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + held,
	} {
		path, heads := rawServer(t, func(string) string { return raw })
		answer, err := httpRequest(path, "PUT", "/v1/attachments/n/c/e%25t", map[string]any{"ips": []string{"198.18.10.2/24"}}, time.Second)
		if err != nil || answer.status != 200 {
			t.Fatalf("%s: %v %+v", name, err, answer)
		}
		body, _ := answer.body.(map[string]any)
		if list, _ := body["ips"].([]any); len(list) != 1 || list[0] != "198.18.10.2/24" {
			t.Errorf("%s: body %v", name, answer.body)
		}
		request := (*heads)[0]
		for _, want := range []string{"PUT /v1/attachments/n/c/e%25t HTTP/1.1\r\n", "Host: masqd\r\n",
			"Content-Type: application/json\r\n", "Connection: close\r\n", `{"ips":["198.18.10.2/24"]}`} {
			if !strings.Contains(request, want) {
				t.Errorf("%s: request lacks %q:\n%s", name, want, request)
			}
		}
	}
}

func TestClientSortsFailuresIntoWaitableAndNot(t *testing.T) {
	dir := t.TempDir()
	_, err := httpRequest(dir+"/absent.sock", "GET", "/readyz", nil, time.Second)
	var u *unreachable
	if !errors.As(err, &u) || !u.retryable || !strings.Contains(u.reason, "no such file or directory") {
		t.Errorf("absent socket: %v", err)
	}
	path, _ := rawServer(t, func(string) string { return "SSH-2.0-OpenSSH\r\n\r\n" })
	_, err = httpRequest(path, "GET", "/readyz", nil, time.Second)
	if !errors.As(err, &u) || u.retryable || !strings.Contains(u.reason, "not an HTTP answer") {
		t.Errorf("not HTTP: %v", err)
	}
	path, _ = rawServer(t, func(string) string { return "HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}" })
	_, err = httpRequest(path, "GET", "/readyz", nil, time.Second)
	if !errors.As(err, &u) || !u.retryable || !strings.Contains(u.reason, "closed before a complete answer") {
		t.Errorf("cut short: %v", err)
	}
}

func TestClientGivesUpOnADaemonThatNeverAnswers(t *testing.T) {
	dir, _ := os.MkdirTemp("/tmp", "mqcni-go-")
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", dir+"/masqd.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // connections queue in the backlog, nobody answers
	_, err = httpRequest(dir+"/masqd.sock", "DELETE", "/v1/attachments/n/c/eth0", nil, 100*time.Millisecond)
	var u *unreachable
	if !errors.As(err, &u) || u.retryable || !strings.Contains(u.reason, "no answer within 0.1s") {
		t.Errorf("got %v", err)
	}
}

func TestPathSegmentsArePercentEncoded(t *testing.T) {
	for in, want := range map[string]string{"eth0": "eth0", "e%t@h ü": "e%25t%40h%20%C3%BC", "a~b.c_d-e": "a~b.c_d-e"} {
		if got := quote(in); got != want {
			t.Errorf("quote(%q) = %q, want %q", in, got, want)
		}
	}
}
