package testmodels

import (
	"os"
	"path/filepath"
	"testing"
)

// RepoRoot must skip a nested module's go.mod (adapters/*) and stop at
// the kvrecall module's own.
func TestRepoRoot(t *testing.T) {
	cases := []struct {
		gomod string
		root  bool
	}{
		{"module github.com/kvrecall/kvrecall\n\ngo 1.26.8\n", true},
		{"// comment\nmodule \"github.com/kvrecall/kvrecall\"\n", true},
		{"module github.com/kvrecall/kvrecall/adapters/eino\n\nreplace github.com/kvrecall/kvrecall => ../..\n", false},
		{"go 1.22\n", false},
	}
	for _, c := range cases {
		t.Run(c.gomod, func(t *testing.T) {
			if got := rootModule([]byte(c.gomod)); got != c.root {
				t.Fatalf("rootModule = %v, want %v", got, c.root)
			}
		})
	}
	want, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	want = filepath.Dir(filepath.Dir(want)) // internal/testmodels -> root
	got, err := RepoRoot()
	if err != nil || got != want {
		t.Fatalf("RepoRoot() = %q, %v; want %q", got, err, want)
	}
}
