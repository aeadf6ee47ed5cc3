// Package runinfo gives every benchmark run its own folder, holding the
// exact command and a description of the machine next to the results.
package runinfo

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"
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
