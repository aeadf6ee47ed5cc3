package redistest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const missing = "redis-server is missing"

// scripts/require-redis.sh, which `make test` runs first, stops with a
// message that names the missing program and how to install it when
// redis-server is not on PATH, and passes when it is.
func TestRequireRedisScript(t *testing.T) {
	script, err := filepath.Abs("../../scripts/require-redis.sh")
	require.NoError(t, err)
	withRedis := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(withRedis, "redis-server"), []byte("#!/bin/sh\n"), 0o755))
	for _, tc := range []struct {
		name   string
		path   string // PATH for the script
		fail   bool
		stderr string
	}{
		{"missing", t.TempDir(), true, missing},
		{"installed", withRedis, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command("/bin/bash", script)
			cmd.Env = []string{"PATH=" + tc.path}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if !tc.fail {
				require.NoError(t, err, stderr.String())
				require.Empty(t, stderr.String())
				return
			}
			var exit *exec.ExitError
			require.True(t, errors.As(err, &exit), "want a non-zero exit, got %v", err)
			require.Equal(t, 1, exit.ExitCode())
			require.Contains(t, stderr.String(), tc.stderr)
			require.Contains(t, stderr.String(), "apt-get install redis-server", "it says how to install it")
		})
	}
}

// `make test` runs the script before anything else, so the message is the
// first thing a machine without redis-server shows.
func TestMakeTestRequiresRedisFirst(t *testing.T) {
	b, err := os.ReadFile("../../Makefile")
	require.NoError(t, err)
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "test:") {
			require.Less(t, i+1, len(lines))
			require.Equal(t, "\t@./scripts/require-redis.sh", lines[i+1], "the first step of make test")
			return
		}
	}
	t.Fatal("the Makefile has no test target")
}

// fatalTB records Start's Fatalf and stops its goroutine, as testing does.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// A test that starts Redis on a machine without redis-server fails with the
// same advice, never skips.
func TestStartWithoutRedisFails(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	f := &fatalTB{TB: t}
	done := make(chan *Server)
	go func() {
		var s *Server
		defer func() { done <- s }()
		s = Start(f)
	}()
	require.Nil(t, <-done, "Start returned a server")
	require.Contains(t, f.msg, "redis-server is not installed")
	require.Contains(t, f.msg, "apt-get install redis-server")
}
