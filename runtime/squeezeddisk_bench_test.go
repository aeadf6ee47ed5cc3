package runtime_test

import (
	"context"
	"os"
	"testing"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// BenchmarkSqueezedFromDisk times squeezed's decode steps on a document
// stored by `bench speed --paged --hyper all --data-dir DIR` (with its
// clusters), as bench speed reads it back: the tiny preset, 1 decode
// thread, a 2048-token budget, against the dense engine at a 2048-token
// context (issue 14's floor) and retro, every engine one step in turn so
// that all see the same machine state. Each engine's steps carry a pprof
// label (engine=NAME), so a -cpuprofile splits by engine:
//
//	cp -r /work/runs/t64data /tmp/sq64
//	KVRECALL_BENCH_DATA=/tmp/sq64/llama-tiny-f16 KVRECALL_BENCH_DOC=speed-hyper-all-65536 \
//	KVRECALL_BENCH_CONTEXTS=65536 go test ./runtime -run XXX -bench SqueezedFromDisk -benchtime 64x -cpuprofile cpu.prof
//	go tool pprof -tagfocus engine=squeezed runtime.test cpu.prof
//
// $KVRECALL_BENCH_ENGINES picks engines by name (the floor always runs).
// kvcache.TokenStaging is set per engine before each of its steps:
// "squeezed" stages its tokens (the default), "squeezed-pools" keeps the
// token pools (the path before staging), in the same alternation.
func BenchmarkSqueezedFromDisk(b *testing.B) {
	path := benchModel(b)
	if b.N == 1 {
		return // the testing package's untimed first call: setup only costs
	}
	ctx := context.Background()
	dir, id := os.Getenv("KVRECALL_BENCH_DATA"), os.Getenv("KVRECALL_BENCH_DOC")
	if dir == "" || id == "" {
		b.Skip("set KVRECALL_BENCH_DATA and KVRECALL_BENCH_DOC to a stored document with squeezed clusters (a copy)")
	}
	contexts := benchContexts(b, 2048, 65536)
	const room, floorCtx = 512, 2048
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: contexts[0] + room, DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	doc, err := m.OpenDocument(id)
	if err != nil {
		b.Fatal(err)
	}
	n := len(doc.TokenIDs()) + 8
	toks := benchPrompt(n+room, m.Config().Vocab)
	defer func(s bool) { kvcache.TokenStaging = s }(kvcache.TokenStaging)
	type engine struct {
		name   string
		method string
		extra  map[string]any
		pools  bool // kvcache.TokenStaging off: token pools
	}
	all := []engine{
		{name: "floor"},
		{name: "retro", method: "retro"},
		{name: "squeezed", method: "squeezed"},                    // the default: host lookup, staged tokens
		{name: "squeezed-pools", method: "squeezed", pools: true}, // host lookup, token pools (before staging)
		{name: "squeezed-graph", method: "squeezed", extra: map[string]any{paging.HostScores: false}},
	}
	engines := pickEngines(b, all, func(e engine) string { return e.name }, func(engine) bool { return false })
	var steps []func() error
	for _, e := range engines {
		if e.method == "" {
			steps = append(steps, floorStep(ctx, b, m, toks[:floorCtx], toks))
			continue
		}
		kvcache.TokenStaging = !e.pools
		_, step := docStep(ctx, b, m, doc, runtime.PolicyOptions{Policy: e.method, Budget: 2048, Extra: e.extra}, toks, n, true, 16)
		staging := !e.pools
		steps = append(steps, func() error { kvcache.TokenStaging = staging; return step() })
	}
	if b.N > room-8 {
		b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, room-8)
	}
	names := make([]string, len(engines))
	for j, e := range engines {
		names[j] = e.name
	}
	alternateSteps(b, ctx, names, steps)
}
