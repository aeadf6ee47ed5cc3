package runtime_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/kvrecall/kvrecall/runtime"
)

// BenchmarkPagedStepGraph times decode steps of window, retro and quest
// over a document (the tiny f16 preset, 1 thread, a 2048-token budget,
// ingested with HyperAttention as BenchmarkQuestFastPath's) with the kept
// step graph (pagedstep.go) and with a graph built for every step, and the
// dense engine at a 2048-token context (issue 14's floor), every engine
// taking one step in turn so that all see the same machine state. It
// reports each median in ms and its ratio to the floor.
//
// The context is 16384 or $KVRECALL_BENCH_CONTEXTS (one number); the
// methods window, retro and quest or $KVRECALL_BENCH_METHODS (comma
// separated: probe's representatives cost a second prefill of the
// document, so it is not a default).
//
//	go test ./runtime -run XXX -bench PagedStepGraph -benchtime 200x
func BenchmarkPagedStepGraph(b *testing.B) {
	ctx := context.Background()
	const room, floorCtx = 1024, 2048
	m, doc, toks, n := hyperBenchDoc(b, room)
	type engine struct {
		name, method string // method "" for the dense engine's floor
		kept         bool
	}
	var engines []engine
	engines = append(engines, engine{name: "floor"})
	methods := []string{"window", "retro", "quest"}
	if v := os.Getenv("KVRECALL_BENCH_METHODS"); v != "" {
		methods = strings.Split(v, ",")
	}
	for _, method := range methods {
		if strings.Contains(method, "+heads") {
			// bench speed's --heads-profile half.
			if err := runtime.ApplyHeadProfile(m, "half"); err != nil {
				b.Fatal(err)
			}
		}
		engines = append(engines, engine{method + "-fresh", method, false}, engine{method + "-kept", method, true})
	}
	var steps []func() error
	var sessions []*runtime.Session
	for _, e := range engines {
		if e.method == "" {
			steps = append(steps, floorStep(ctx, b, m, toks[:floorCtx], toks))
			sessions = append(sessions, nil)
			continue
		}
		old := runtime.SetPagedStepGraphs(e.kept)
		s, step := docStep(ctx, b, m, doc, runtime.PolicyOptions{Policy: e.method, Budget: 2048}, toks, n, true, 16)
		runtime.SetPagedStepGraphs(old)
		steps = append(steps, step)
		sessions = append(sessions, s)
	}
	if b.N > room {
		b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, room)
	}
	names := make([]string, len(engines))
	for j, e := range engines {
		names[j] = e.name
	}
	alternateSteps(b, ctx, names, steps)
	for j, e := range engines {
		if e.kept {
			if builds := runtime.PagedStepBuilds(sessions[j]); builds <= 0 || builds > b.N/4+2 {
				b.Errorf("%s built %d step graphs in %d steps", e.name, builds, b.N)
			} else {
				b.Logf("%s: %d step graphs built in %d steps", e.name, builds, b.N)
			}
		}
	}
}
