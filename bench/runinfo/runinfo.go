// Package runinfo gives every benchmark run its own folder, holding the
// exact command and a description of the machine next to the results.
package runinfo

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/device"
)

// Prepare creates dir (if needed) and writes command.txt (appending when a
// run resumes) and machine.txt.
func Prepare(dir string, args []string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, "command.txt"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " \t'\"") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		quoted[i] = a
	}
	fmt.Fprintf(f, "# %s\n%s\n", time.Now().UTC().Format(time.RFC3339), strings.Join(quoted, " "))
	if err := f.Close(); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "machine.txt"), []byte(Machine()), 0o644)
}

// DefaultDir is bench/results/<name>-<timestamp> under the working directory.
func DefaultDir(name string) string {
	return filepath.Join("bench", "results", name+"-"+time.Now().Format("20060102-150405"))
}

// Machine describes the host: CPU, cores, memory, OS, Go, build flags, commit.
func Machine() string {
	var b strings.Builder
	fmt.Fprintf(&b, "cpu: %s\n", cpuModel())
	fmt.Fprintf(&b, "cores: %d\n", runtime.NumCPU())
	fmt.Fprintf(&b, "memory: %s\n", memTotal())
	fmt.Fprintf(&b, "os/arch: %s/%s\n", runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "go: %s\n", runtime.Version())
	// The devices ggml has (a GPU run names its GPU here; docs/gpu.md).
	for _, d := range device.List() {
		fmt.Fprintf(&b, "device: %s\n", d)
	}
	fmt.Fprintf(&b, "cgo cflags: %s\n", os.Getenv("CGO_CFLAGS"))
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" || s.Key == "vcs.modified" {
				fmt.Fprintf(&b, "%s: %s\n", s.Key, s.Value)
			}
		}
	}
	if out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		fmt.Fprintf(&b, "git: %s", out)
	}
	return b.String()
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var model, flags string
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			if model == "" {
				model = strings.TrimSpace(v)
			}
		case "flags":
			if flags == "" {
				for _, fl := range strings.Fields(v) {
					switch fl {
					case "avx2", "fma", "f16c", "avx512f":
						flags += " " + fl
					}
				}
			}
		}
	}
	return model + " (" + strings.TrimSpace(flags) + ")"
}

func memTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "MemTotal:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "MemTotal:"))
		}
	}
	return "unknown"
}

// Appender writes JSON lines, one write and sync per record, so that an
// interrupted run keeps every finished record.
type Appender struct{ f *os.File }

// OpenAppender opens path for appending; a torn last line (a run killed
// while writing it) is ended with a newline so that new lines stay readable.
func OpenAppender(path string) (*Appender, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err == nil && st.Size() > 0 {
		last := make([]byte, 1)
		if _, err := f.ReadAt(last, st.Size()-1); err == nil && last[0] != '\n' {
			f.Write([]byte("\n"))
		}
	}
	return &Appender{f: f}, nil
}

// Write appends one record.
func (a *Appender) Write(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := a.f.Write(append(b, '\n')); err != nil {
		return err
	}
	return a.f.Sync()
}

// Close closes the file.
func (a *Appender) Close() error { return a.f.Close() }

// ReadLines decodes every complete JSON line of path into T (a missing file
// is empty; torn or foreign lines are skipped).
func ReadLines[T any](path string) ([]T, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []T
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var v T
		if json.Unmarshal(sc.Bytes(), &v) == nil {
			out = append(out, v)
		}
	}
	return out, sc.Err()
}
