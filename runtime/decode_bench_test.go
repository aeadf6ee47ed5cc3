package runtime_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	ollamakv "github.com/ollama/ollama/kvcache"

	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// BenchmarkDecodeStep times one single-token decode step (1 thread) after
// a prompt of the given context, in our engine (dense engine cache, paged
// cache with every page, retro and quest over an ingested document at a
// 2048-token budget) and in llama.cpp on the same GGUF. It exists to profile the
// fixed per-step cost (issue 14): run it under perf or -cpuprofile with
// -benchtime of a few hundred steps, so that the steps outweigh the prompt.
//
// Contexts are 2048 and 8192, or $KVRECALL_BENCH_CONTEXTS (comma
// separated). The model is $KVRECALL_BENCH_MODEL, else the foundry's tiny f16 preset in
// build/models (`make`, or `kvrecall bench speed` builds it).
//
//	go test ./runtime -run XXX -bench DecodeStep -benchtime 200x
func BenchmarkDecodeStep(b *testing.B) {
	path := benchModel(b)
	ctx := context.Background()
	const extra = 4096 // room for the timed steps
	for _, n := range benchContexts(b, 8, 2048, 8192) {
		open := func(b *testing.B, sq ...*squeezed.Options) (*runtime.Model, []int32) {
			o := runtime.Options{Threads: 1, ContextLength: n + extra, DataDir: b.TempDir()}
			if len(sq) > 0 {
				o.Squeezed = sq[0] // documents ingested with clusters
			}
			m, err := runtime.Open(ctx, path, o)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(m.Close)
			return m, benchPrompt(n+extra, m.Config().Vocab)
		}
		step := func(b *testing.B, s *runtime.Session, toks []int32) {
			if b.N > extra {
				b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, extra)
			}
			b.ResetTimer()
			up0 := int64(0)
			if pc, ok := s.Cache().(*kvcache.Paged); ok {
				up0 = pc.Stats().UploadedBytes
			}
			perfControl(b, "enable")
			for i := range b.N {
				if _, err := s.Eval(ctx, toks[n+i:n+i+1], false, nil); err != nil {
					b.Fatal(err)
				}
			}
			perfControl(b, "disable")
			if pc, ok := s.Cache().(*kvcache.Paged); ok {
				b.ReportMetric(float64(pc.Stats().UploadedBytes-up0)/float64(b.N), "uploaded-B/op")
			}
		}
		for _, c := range []struct {
			name    string
			factory func() runtime.CacheFactory
		}{
			{"dense", func() runtime.CacheFactory { return runtime.DenseCache }},
			{"paged-dense", func() runtime.CacheFactory { return runtime.PagedCache(runtime.PolicyOptions{Policy: "dense"}) }},
		} {
			b.Run(fmt.Sprintf("kvrecall/%s/%d", c.name, n), func(b *testing.B) {
				m, toks := open(b)
				s, err := m.NewSessionWith(c.factory())
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				if _, err := s.Eval(ctx, toks[:n], false, nil); err != nil {
					b.Fatal(err)
				}
				step(b, s, toks)
			})
		}
		for _, c := range []struct {
			name, method string
			extra        map[string]any
			pools        bool // kvcache.TokenStaging off: token pools instead of staged tokens
		}{
			{"retro", "retro", nil, false},
			{"quest", "quest", nil, false},
			// quest scoring each step's own queries on the host: a graph
			// split per layer (before in-graph scoring).
			{"quest-host", "quest", map[string]any{paging.HostScores: true}, false},
			// quest taking the lagged top pages at every step (no hysteresis).
			{"quest-keep0", "quest", map[string]any{paging.KeepLogits: 0.0}, false},
			// quest never replacing a held page (no uploads after the
			// question's): what the in-graph bounds alone cost over retro.
			{"quest-keepall", "quest", map[string]any{paging.KeepLogits: 1e9}, false},
			// squeezed: centroid scores in the graph, one step late.
			// (opt-in: HostScores false; the default is the host lookup).
			{"squeezed", "squeezed", map[string]any{paging.HostScores: false}, false},
			// squeezed looking its clusters up on the host each step (a
			// graph split per layer; the default).
			{"squeezed-host", "squeezed", nil, false},
			// The same two with token pools (LRU, host copies) instead of
			// staging buffers (kvcache.TokenStaging off: the path before).
			{"squeezed-pools", "squeezed", map[string]any{paging.HostScores: false}, true},
			{"squeezed-host-pools", "squeezed", nil, true},
			// squeezed keeping the clusters it holds unless others score
			// 4 or 1e9 attention logits higher (a hysteresis, not the paper's rule).
			{"squeezed-keep4", "squeezed", map[string]any{paging.HostScores: false, squeezed.KeepKey: 4.0}, false},
			{"squeezed-keepall", "squeezed", map[string]any{paging.HostScores: false, squeezed.KeepKey: 1e9}, false},
		} {
			b.Run(fmt.Sprintf("kvrecall/%s-2048/%d", c.name, n), func(b *testing.B) {
				defer func(s bool) { kvcache.TokenStaging = s }(kvcache.TokenStaging)
				kvcache.TokenStaging = !c.pools
				var sq []*squeezed.Options
				if c.method == "squeezed" {
					sq = append(sq, &squeezed.Options{})
				}
				m, toks := open(b, sq...)
				doc, err := m.IngestTokensWith(ctx, "doc", toks[:n-8], runtime.IngestOptions{}, nil)
				if err != nil {
					b.Fatal(err)
				}
				s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: c.method, Budget: 2048, Extra: c.extra})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				if _, err := s.Eval(ctx, toks[n-8:n], false, nil); err != nil { // the question
					b.Fatal(err)
				}
				step(b, s, toks)
			})
		}
		b.Run(fmt.Sprintf("llama.cpp/%d", n), func(b *testing.B) {
			ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, Context: n + extra})
			if err != nil {
				b.Fatal(err)
			}
			defer ref.Close()
			toks := benchPrompt(n+extra, ref.VocabSize())
			if _, err := ref.Append(toks[:n], false, nil); err != nil {
				b.Fatal(err)
			}
			if b.N > extra {
				b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, extra)
			}
			b.ResetTimer()
			perfControl(b, "enable")
			for i := range b.N {
				if _, err := ref.Append(toks[n+i:n+i+1], false, nil); err != nil {
					b.Fatal(err)
				}
			}
			perfControl(b, "disable")
		})
	}
}

// perfControl sends cmd ("enable", "disable") to the perf control FIFO in
// $KVRECALL_PERF_CTL, so that a profile holds only the timed steps, not the
// prompt's prefill:
//
//	mkfifo /tmp/ctl && KVRECALL_PERF_CTL=/tmp/ctl perf record -D -1 --control fifo:/tmp/ctl -g ./runtime.test -test.bench ...
func perfControl(b *testing.B, cmd string) {
	path := os.Getenv("KVRECALL_PERF_CTL")
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatalf("perf control %s: %v", path, err)
	}
	defer f.Close()
	if _, err := f.WriteString(cmd + "\n"); err != nil {
		b.Fatalf("perf control %s: %v", path, err)
	}
}

// BenchmarkDecodeStepAlternated times one-token decode steps (1 thread) of
// ollama's causal cache (what DenseCache was before issue 14), DenseCache
// and llama.cpp on the same GGUF, alternating them step by step in one
// process so that all see the same machine state (other processes on a
// shared machine move separate runs by more than the differences
// measured). It reports each median in ms and its ratio to llama.cpp's.
// "three" alternates all three (each DenseCache step follows another
// kvrecall step), "pair" only DenseCache and llama.cpp (each of our steps
// follows llama.cpp's, as in bench speed): the difference is what our
// host-side work costs when it runs on caches llama.cpp's step just used.
//
//	go test ./runtime -run XXX -bench DecodeStepAlternated -benchtime 300x
func BenchmarkDecodeStepAlternated(b *testing.B) {
	path := benchModel(b)
	ctx := context.Background()
	const extra = 1024 // room for the timed steps
	causal := func(m *runtime.Model) (ollamakv.Cache, error) {
		c := ollamakv.NewCausalCache(m.Arch().Shift)
		c.Init(m.Backend(), m.KVType(), 1, m.Options().ContextLength, m.Options().BatchSize)
		return c, nil
	}
	for _, n := range []int{2048, 8192} {
		for _, mode := range []struct {
			name  string
			ours  []runtime.CacheFactory
			names []string
		}{
			{"three", []runtime.CacheFactory{causal, runtime.DenseCache}, []string{"causal", "dense"}},
			{"pair", []runtime.CacheFactory{runtime.DenseCache}, []string{"dense"}},
		} {
			b.Run(fmt.Sprintf("%d/%s", n, mode.name), func(b *testing.B) {
				if b.N > extra {
					b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, extra)
				}
				m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: n + extra, DataDir: b.TempDir()})
				if err != nil {
					b.Fatal(err)
				}
				defer m.Close()
				toks := benchPrompt(n+extra, m.Config().Vocab)
				var steps []func() error
				for _, f := range mode.ours {
					s, err := m.NewSessionWith(f)
					if err != nil {
						b.Fatal(err)
					}
					defer s.Close()
					if _, err := s.Eval(ctx, toks[:n], false, nil); err != nil {
						b.Fatal(err)
					}
					steps = append(steps, func() error {
						_, err := s.Eval(ctx, toks[s.Len():s.Len()+1], false, nil)
						return err
					})
				}
				ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, Context: n + extra})
				if err != nil {
					b.Fatal(err)
				}
				defer ref.Close()
				if _, err := ref.Append(toks[:n], false, nil); err != nil {
					b.Fatal(err)
				}
				next := n
				steps = append(steps, func() error {
					_, err := ref.Append(toks[next:next+1], false, nil)
					next++
					return err
				})
				times := make([][]float64, len(steps))
				b.ResetTimer()
				for range b.N {
					for j, step := range steps {
						t0 := time.Now()
						if err := step(); err != nil {
							b.Fatal(err)
						}
						times[j] = append(times[j], float64(time.Since(t0))/float64(time.Millisecond))
					}
				}
				b.StopTimer()
				med := make([]float64, len(times))
				for j, t := range times {
					slices.Sort(t)
					med[j] = t[len(t)/2]
				}
				llama := med[len(med)-1]
				b.ReportMetric(llama, "ms-llama.cpp")
				for j, name := range mode.names {
					b.ReportMetric(med[j], "ms-"+name)
					b.ReportMetric(med[j]/llama, name+"/llama")
				}
			})
		}
	}
}

// benchPrompt is n of bench/speed's pseudo-random tokens for a vocabulary
// of vocab (ids from 3 on: past the special tokens).
func benchPrompt(n, vocab int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(3 + (i*7919)%(vocab-3))
	}
	return p
}

// benchContexts is $KVRECALL_BENCH_CONTEXTS (comma separated, each above
// min), else def.
func benchContexts(b *testing.B, min int, def ...int) []int {
	b.Helper()
	env := os.Getenv("KVRECALL_BENCH_CONTEXTS") // e.g. "16384"
	if env == "" {
		return def
	}
	var contexts []int
	for _, f := range strings.Split(env, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= min {
			b.Fatalf("KVRECALL_BENCH_CONTEXTS: bad context %q (each above %d)", f, min)
		}
		contexts = append(contexts, n)
	}
	return contexts
}

// benchModel is the GGUF the runtime benchmarks time: $KVRECALL_BENCH_MODEL,
// else the foundry's tiny f16 preset in build/models (`make`, or `kvrecall
// bench speed` builds it). It skips the benchmark when there is none.
func benchModel(b *testing.B) string {
	b.Helper()
	path := os.Getenv("KVRECALL_BENCH_MODEL")
	if path == "" {
		root, err := testmodels.RepoRoot()
		if err != nil {
			b.Fatal(err)
		}
		path = filepath.Join(root, "build", "models", "llama-tiny-f16.gguf")
	}
	if _, err := os.Stat(path); err != nil {
		b.Skipf("no model to benchmark: %v (set KVRECALL_BENCH_MODEL)", err)
	}
	return path
}
