package runtime_test

import (
	"context"
	"fmt"
	"runtime/pprof"
	"slices"
	"testing"
	"time"

	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// BenchmarkQuestFastPath times quest's decode steps on the whole engine
// (the tiny f16 preset, 1 thread, a 2048-token budget) over a document
// ingested with HyperAttention on every layer (as `bench speed --hyper all
// --skip-dense`), its box updates and bound made two ways: "before" (box
// rows copied in through the graph, the mul_mat over exactly the pages:
// kvcache.HostBounds off, BoxRowMultiple 1) and "after" (the CPU
// default). retro on the same document and the dense engine at a
// 2048-token context (the floor of issue 14) run in the same process, and
// every engine takes one step in turn, so that all see the same machine
// state. It reports each median in ms and its ratio to the floor.
//
// The context is 16384 or $KVRECALL_BENCH_CONTEXTS (one number).
//
//	go test ./runtime -run XXX -bench QuestFastPath -benchtime 200x
func BenchmarkQuestFastPath(b *testing.B) {
	ctx := context.Background()
	const room, floorCtx = 1024, 2048
	m, doc, toks, n := hyperBenchDoc(b, room)
	defer func(h bool, r int) { kvcache.HostBounds, kvcache.BoxRowMultiple = h, r }(kvcache.HostBounds, kvcache.BoxRowMultiple)
	type engine struct {
		name        string
		method      string // "" for the dense engine's floor
		host        bool
		rowMultiple int
	}
	engines := []engine{
		{name: "floor"},
		{name: "retro", method: "retro", host: true, rowMultiple: 16},
		{name: "quest-before", method: "quest", host: false, rowMultiple: 1},
		{name: "quest-after", method: "quest", host: true, rowMultiple: 16},
	}
	var steps []func() error
	for _, e := range engines {
		kvcache.HostBounds, kvcache.BoxRowMultiple = e.host, e.rowMultiple
		if e.method == "" {
			steps = append(steps, floorStep(ctx, b, m, toks[:floorCtx], toks))
			continue
		}
		_, step := docStep(ctx, b, m, doc, runtime.PolicyOptions{Policy: e.method, Budget: 2048}, toks, n, e.host, e.rowMultiple)
		steps = append(steps, step)
	}
	if b.N > room {
		b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, room)
	}
	names := make([]string, len(engines))
	for j, e := range engines {
		names[j] = e.name
	}
	med := alternateSteps(b, ctx, names, steps)
	b.Log(fmt.Sprintf("context %d: quest after − before %.3f ms, quest after − retro %.3f ms", n, med[3]-med[2], med[3]-med[1]))
}

// alternateSteps times b.N rounds in which every step of steps runs once,
// in order (the floor first), each under a pprof label engine=NAME so
// that a -cpuprofile splits by engine (go tool pprof -tagfocus
// engine=quest runtime.test cpu.prof), and reports each engine's median
// in ms ("ms-NAME") and, after the first, its ratio to the first
// ("NAME/floor"). Returns the medians.
func alternateSteps(b *testing.B, ctx context.Context, names []string, steps []func() error) []float64 {
	times := make([][]float64, len(steps))
	labels := make([]context.Context, len(names))
	for j, name := range names {
		labels[j] = pprof.WithLabels(ctx, pprof.Labels("engine", name))
	}
	b.ResetTimer()
	perfControl(b, "enable")
	for range b.N {
		for j, step := range steps {
			pprof.SetGoroutineLabels(labels[j])
			t0 := time.Now()
			if err := step(); err != nil {
				b.Fatal(err)
			}
			times[j] = append(times[j], float64(time.Since(t0))/float64(time.Millisecond))
		}
	}
	pprof.SetGoroutineLabels(ctx)
	perfControl(b, "disable")
	b.StopTimer()
	med := medians(times)
	for j, name := range names {
		b.ReportMetric(med[j], "ms-"+name)
		if j > 0 {
			b.ReportMetric(med[j]/med[0], name+"/floor")
		}
	}
	return med
}

// hyperBenchDoc opens $KVRECALL_BENCH_MODEL (1 thread, closed when the
// benchmark ends) and ingests with HyperAttention on every layer, as
// `bench speed --hyper all --skip-dense` does, a document of n-8 tokens of
// toks, n the benchmark's context (16384 or $KVRECALL_BENCH_CONTEXTS, one
// number): toks has room tokens more, for the question and the steps.
func hyperBenchDoc(b *testing.B, room int) (*runtime.Model, *runtime.Document, []int32, int) {
	ctx := context.Background()
	contexts := benchContexts(b, 2048, 16384)
	if len(contexts) != 1 {
		b.Fatalf("KVRECALL_BENCH_CONTEXTS: %v: one context", contexts)
	}
	n := contexts[0]
	m, err := runtime.Open(ctx, benchModel(b), runtime.Options{Threads: 1, ContextLength: n + room, DataDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(m.Close)
	toks := benchPrompt(n+room, m.Config().Vocab)
	doc, err := m.IngestTokensWith(ctx, "doc", toks[:n-8], runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: hyper.Default()}}, nil)
	if err != nil {
		b.Fatal(err)
	}
	return m, doc, toks, n
}

// floorStep is the floor's decode step for the quest benchmarks: a
// DenseCache session that read prompt, then takes the next token of toks
// at each call (closed when the benchmark ends).
func floorStep(ctx context.Context, b *testing.B, m *runtime.Model, prompt, toks []int32) func() error {
	s, err := m.NewSessionWith(runtime.DenseCache)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Close)
	if _, err := s.Eval(ctx, prompt, false, nil); err != nil {
		b.Fatal(err)
	}
	return func() error {
		_, err := s.Eval(ctx, toks[s.Len():s.Len()+1], false, nil)
		return err
	}
}

// docStep is a method's decode step for the quest benchmarks: a session
// of doc (its first n tokens) under opts that read the question
// toks[n-8:n], then takes the next token of toks at each call with quest's
// CPU fast-path settings host and rowMultiple (closed when the benchmark
// ends).
func docStep(ctx context.Context, b *testing.B, m *runtime.Model, doc *runtime.Document, opts runtime.PolicyOptions,
	toks []int32, n int, host bool, rowMultiple int) (*runtime.Session, func() error) {
	s, err := m.DocumentSession(doc, opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Close)
	if _, err := s.Eval(ctx, toks[n-8:n], false, nil); err != nil { // the question
		b.Fatal(err)
	}
	next := n
	return s, func() error {
		kvcache.HostBounds, kvcache.BoxRowMultiple = host, rowMultiple
		_, err := s.Eval(ctx, toks[next:next+1], false, nil)
		next++
		return err
	}
}

// medians returns the median of each engine's step times (sorting them).
func medians(times [][]float64) []float64 {
	med := make([]float64, len(times))
	for j, t := range times {
		slices.Sort(t)
		med[j] = t[len(t)/2]
	}
	return med
}
