package runtime_test

import (
	"context"
	"testing"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// BenchmarkQuestUploads times quest's decode steps on the whole engine
// (the tiny f16 preset, 1 thread, an 8k document, a 2048-token budget)
// with its page uploads made the two ways the CPU backend can make them:
// inside the graph through input tensors (what other backends do) and as
// plain copies into the host pool (kvcache.HostUploads, the CPU default).
// With -count N the two alternate, so their ratio is measured in one run;
// the difference is what the copy's machinery costs per step.
//
//	go test ./runtime -run XXX -bench QuestUploads -benchtime 300x -count 3
func BenchmarkQuestUploads(b *testing.B) {
	path := benchModel(b)
	ctx := context.Background()
	const n, room = 8192, 1024
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: n + room, DataDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	toks := benchPrompt(n+room, m.Config().Vocab)
	doc, err := m.IngestTokensWith(ctx, "doc", toks[:n-8], runtime.IngestOptions{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer func(h bool) { kvcache.HostUploads = h }(kvcache.HostUploads)
	for _, mode := range []struct {
		name string
		host bool
	}{{"graph-uploads", false}, {"host-copies", true}} {
		b.Run(mode.name, func(b *testing.B) {
			kvcache.HostUploads = mode.host
			s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "quest", Budget: 2048})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if _, err := s.Eval(ctx, toks[n-8:n], false, nil); err != nil { // the question
				b.Fatal(err)
			}
			if b.N > room {
				b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, room)
			}
			c := s.Cache().(*kvcache.Paged)
			before := c.Stats().UploadedBytes
			b.ResetTimer()
			for i := range b.N {
				if _, err := s.Eval(ctx, toks[n+i:n+i+1], false, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(c.Stats().UploadedBytes-before)/float64(b.N)/(1<<20), "MiB/step")
		})
	}
}
