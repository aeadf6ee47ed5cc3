package foundry

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kvrecall/kvrecall/gguf"
)

// ModelsDir is where commands keep foundry models: $KVRECALL_MODELS, or
// kvrecall/models under the user cache directory.
func ModelsDir() (string, error) {
	d := os.Getenv("KVRECALL_MODELS")
	if d == "" {
		c, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("no models directory: set KVRECALL_MODELS (%w)", err)
		}
		d = filepath.Join(c, "kvrecall", "models")
	}
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", err
	}
	return d, nil
}

// Version changes whenever the foundry's output changes; every file it
// writes records it (general.kvrecall.foundry_version) and Ensure rebuilds
// files of another version.
const Version = "3"

const versionKey = "general.kvrecall.foundry_version"

// Current reports whether path is a readable GGUF file written by this
// version of the foundry.
func Current(path string) bool {
	f, err := gguf.Open(path)
	return err == nil && f.String(versionKey) == Version
}

// Ensure returns dir/name, building it with build when it is absent, not a
// readable GGUF file, or from another foundry version. notify, if set, is
// told before a build starts.
func Ensure(dir, name string, build func(path string) error, notify func(path string)) (string, error) {
	p := filepath.Join(dir, name)
	if Current(p) {
		return p, nil
	}
	if notify != nil {
		notify(p)
	}
	if err := build(p); err != nil {
		return "", err
	}
	return p, nil
}

// EnsureRecall returns the default recall model in dir, building it if absent.
func EnsureRecall(dir string, notify func(path string)) (string, error) {
	return Ensure(dir, "recall.gguf", func(p string) error {
		_, err := WriteRecall(p, RecallOptions{})
		return err
	}, notify)
}

// EnsurePreset returns a random model of a preset in dir, building it if absent.
func EnsurePreset(dir, arch, preset string, dtype DType, notify func(path string)) (string, error) {
	shape, ok := Presets[preset]
	if !ok {
		return "", fmt.Errorf("unknown preset %q", preset)
	}
	return Ensure(dir, fmt.Sprintf("%s-%s-%s.gguf", arch, preset, dtype), func(p string) error {
		return WriteRandom(p, RandomOptions{Arch: arch, Shape: shape, DType: dtype, Seed: 1})
	}, notify)
}
