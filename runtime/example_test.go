package runtime_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/runtime"
)

// Open loads a GGUF model (here a small random llama from the foundry).
func ExampleOpen() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "tiny.gguf")
	if err := foundry.WriteRandom(path, foundry.RandomOptions{Arch: "llama", Shape: foundry.Presets["tiny"], DType: foundry.Q4_K_M, Seed: 1}); err != nil {
		fmt.Println(err)
		return
	}
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 1024, DataDir: dir})
	if err != nil {
		fmt.Println(err) // bad files give errors that name the file and the problem
		return
	}
	defer m.Close()
	c := m.Config()
	fmt.Println(c.Arch, c.Layers, "layers,", c.Heads, "heads,", c.KVHeads, "KV heads")
	// Output: llama 4 layers, 8 heads, 2 KV heads
}

// A document is prefilled once; questions reuse its pages and attend to a
// budget of them. Here the foundry's recall model finds a needle in a
// 4096-token haystack with retro's pages for its retrieval heads and only
// sinks + a recent window for its other KV heads ("retro+heads").
func ExampleModel_DocumentSession() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "recall.gguf")
	if _, err := foundry.WriteRecall(path, foundry.RecallOptions{}); err != nil {
		fmt.Println(err)
		return
	}
	f, _ := gguf.Open(path)
	voc, _ := haystack.LoadVocab(f)
	c, _ := voc.NewCase(4096, []float64{0.5}, 7)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 4200, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	doc, err := m.IngestTokens(ctx, "haystack", c.Tokens, nil) // prefill once; pages to RAM and disk
	if err != nil {
		fmt.Println(err)
		return
	}
	s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "retro+heads", Budget: 1024})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close()
	n := c.Needles[0]
	res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("found the needle:", slices.Equal(res.Tokens, n.Values))
	fmt.Println("document tokens reused:", res.CachedTokens)
	// Output:
	// found the needle: true
	// document tokens reused: 4096
}

// Stream yields tokens as they are generated; breaking out of the loop (or
// cancelling the context) stops generation.
func ExampleModel_Stream() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "tiny.gguf")
	if err := foundry.WriteRandom(path, foundry.RandomOptions{Arch: "llama", Shape: foundry.Presets["tiny"], DType: foundry.F16, Seed: 1}); err != nil {
		fmt.Println(err)
		return
	}
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 256, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	n := 0
	for _, err := range m.Stream(context.Background(), "a b c", runtime.GenerateOptions{MaxTokens: 32}) {
		if err != nil {
			fmt.Println(err)
			return
		}
		if n++; n == 5 {
			break // stops generation
		}
	}
	fmt.Println("tokens received:", n)
	// Output: tokens received: 5
}
