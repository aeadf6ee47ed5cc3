// Package testmodels gives tests the GGUF files they need: foundry models
// built once and shared between test processes (written atomically, so
// concurrent builders are harmless), and the pretrained stories260k model
// from ../shared, which must be present (CI has it; a missing file fails).
package testmodels

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
)

var mu sync.Mutex

// Quiet sets the default logger to warnings only: ggml and llama.cpp log
// every load at info level.
func Quiet() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
}

// Dir is where generated models are kept ($KVRECALL_TEST_MODELS or a
// directory under the system temp dir).
func Dir(t testing.TB) string {
	d := os.Getenv("KVRECALL_TEST_MODELS")
	if d == "" {
		d = filepath.Join(os.TempDir(), "kvrecall-test-models-v"+foundry.Version)
	}
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func cached(t testing.TB, name string, build func(path string) error) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	p := filepath.Join(Dir(t), name)
	if _, err := gguf.Open(p); err == nil && (strings.HasPrefix(name, "stories") || foundry.Current(p)) {
		return p
	}
	if err := build(p); err != nil {
		t.Fatalf("build %s: %v", name, err)
	}
	return p
}

// Recall returns the default recall model (2 layers, f32).
func Recall(t testing.TB) string {
	return RecallWith(t, foundry.RecallOptions{})
}

// RecallWith returns a recall model with the given options.
func RecallWith(t testing.TB, o foundry.RecallOptions) string {
	variant := ""
	if o.Salience {
		variant = "-salience" // a new name: cached models are never rebuilt differently
	}
	if o.Plain {
		variant = "-plain"
	}
	name := fmt.Sprintf("recall-l%d-p%d-r%d-%s-s%d%s.gguf", o.Layers, o.PrevLayer, o.RetrievalLayer, o.DType, o.Seed, variant)
	if o.Deep {
		name = fmt.Sprintf("recall-deep-%s-s%d%s.gguf", o.DType, o.Seed, variant)
	}
	return cached(t, name, func(p string) error {
		_, err := foundry.WriteRecall(p, o)
		return err
	})
}

// Random returns a random model of a preset.
func Random(t testing.TB, arch, preset string, dtype foundry.DType, seed uint64, ropeFreqs bool) string {
	name := fmt.Sprintf("random-%s-%s-%s-s%d-rf%v.gguf", arch, preset, dtype, seed, ropeFreqs)
	return cached(t, name, func(p string) error {
		return foundry.WriteRandom(p, foundry.RandomOptions{Arch: arch, Shape: foundry.Presets[preset], DType: dtype, Seed: seed, RopeFreqs: ropeFreqs})
	})
}

// Stories returns ../shared/models/stories260k-f32.gguf (GGUF v1). A test
// that needs it fails when it is missing.
func Stories(t testing.TB) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, "..", "shared", "models", "stories260k-f32.gguf")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("the pretrained test model is missing: %v (tests need ../shared beside the repository)", err)
	}
	return p
}

// StoriesWithTemplate returns a copy of StoriesV3 in a test's temporary
// directory whose tokenizer.chat_template is tpl.
func StoriesWithTemplate(t testing.TB, tpl string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "stories-template.gguf")
	err := gguf.Copy(StoriesV3(t), path, func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
		kv["tokenizer.chat_template"] = tpl
		return ts, nil
	})
	if err != nil {
		t.Fatalf("stories with a chat template: %v", err)
	}
	return path
}

// StoriesV3 returns stories260k re-encoded as GGUF v3 (llama.cpp refuses v1).
func StoriesV3(t testing.TB) string {
	src := Stories(t)
	return cached(t, "stories260k-f32-v3.gguf", func(p string) error { return gguf.Upgrade(src, p) })
}

// RepoRoot walks up from the working directory to the directory whose
// go.mod declares the kvrecall module. Nested modules (adapters/*) have
// their own go.mod, so the first go.mod above a test is not always the
// root, and ../shared lies beside the root.
func RepoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && rootModule(b) {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod declaring module %s above the working directory", modulePath)
		}
		d = parent
	}
}

const modulePath = "github.com/kvrecall/kvrecall"

// rootModule reports whether a go.mod's module line names the kvrecall module.
func rootModule(gomod []byte) bool {
	for _, line := range strings.Split(string(gomod), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == modulePath
		}
	}
	return false
}

// CPUBackends is the folder of the ggml CPU variant libraries that
// `make cpu-backends` builds (make test does) for the loader's tests. A
// missing library fails the test: it names the make target.
func CPUBackends(t testing.TB) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "build", "test", "lib", "ollama")
	for _, v := range []string{"x64", "haswell"} {
		if _, err := os.Stat(filepath.Join(dir, "libggml-cpu-"+v+".so")); err != nil {
			t.Fatalf("the CPU variant libraries are missing (%v): make cpu-backends builds them (make test does)", err)
		}
	}
	return dir
}

// NoBackendLibraries makes the process load no ggml backend library (its
// devices then do not depend on the caller's environment): ollama's loader
// reads OLLAMA_LIBRARY_PATH once, and an empty one names no folder, where
// an unset one would mean ../lib/ollama next to the test binary. For
// TestMain, before any model opens.
func NoBackendLibraries() {
	os.Setenv("OLLAMA_LIBRARY_PATH", "")
}
