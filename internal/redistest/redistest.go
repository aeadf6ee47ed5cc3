// Package redistest starts a real redis-server for tests: on a free
// loopback port, with its files in the test's temporary directory, stopped
// when the test ends. A missing redis-server fails the test (it is a
// dependency of `make test`, installed by scripts/setup-build.sh), so that
// the shared-store tests can never be skipped silently.
package redistest

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Server is a running redis-server.
type Server struct {
	Addr string // 127.0.0.1:port
	URL  string // redis://127.0.0.1:port/0
	cmd  *exec.Cmd
	logs *bytes.Buffer
	once sync.Once
	t    testing.TB
}

// Start starts redis-server with the given extra "--name value" arguments
// (e.g. "--maxmemory", "8mb").
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server is not installed, and the shared-store tests need a real one: run scripts/setup-build.sh as root (it installs the Debian package redis-server) or `apt-get install redis-server`")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir := t.TempDir()
	// No persistence (a test's data is thrown away) and no protected-mode
	// surprises: it binds loopback only.
	args := append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no"}, extra...)
	cmd := exec.Command(bin, args...)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	s := &Server{Addr: fmt.Sprintf("127.0.0.1:%d", port), cmd: cmd, logs: logs, t: t}
	s.URL = "redis://" + s.Addr + "/0"
	t.Cleanup(s.Kill)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.Addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return s
		}
		if time.Now().After(deadline) {
			s.Kill()
			t.Fatalf("redis-server did not listen on %s: %s", s.Addr, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill stops the server at once (SIGKILL: the fault the tests simulate).
func (s *Server) Kill() {
	s.once.Do(func() {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	})
}

// CLI runs redis-cli against the server and returns its output.
func (s *Server) CLI(args ...string) (string, error) {
	host, port, _ := net.SplitHostPort(s.Addr)
	out, err := exec.Command("redis-cli", append([]string{"-h", host, "-p", port}, args...)...).CombinedOutput()
	return string(bytes.TrimSpace(out)), err
}
