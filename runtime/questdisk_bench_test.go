package runtime_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	goruntime "runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/heapwarm"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// BenchmarkQuestFromDisk times quest's decode steps as `bench speed
// --paged --hyper all --skip-dense` does: the document is ingested with
// HyperAttention on every layer by a model of its own (2 threads, untimed)
// and read back from its page file by the decoding model (1 thread), and
// quest's variants, retro, a paged dense session over the whole document
// (bench speed's step just before window and quest) and the dense engine
// at a 2048-token context (issue 14's floor) take one step in turn, so
// that all see the same machine state. Each engine's median step (ms),
// its ratio to the floor and its uploads per step are reported.
//
// The model is $KVRECALL_BENCH_MODEL (the 1b preset is what this was made
// for: `bench speed` at 1b is too noisy to compare two quest paths), the
// context 8192 or $KVRECALL_BENCH_CONTEXTS (one number).
// $KVRECALL_BENCH_DATA keeps the ingested document between runs (an 8k
// 1b hyper ingest takes ~3 minutes); else a temporary directory.
// $KVRECALL_BENCH_DOC names a document already stored in
// $KVRECALL_BENCH_DATA to read instead (no ingest; a copy of a `bench
// speed --data-dir` document: DIR/<model file>/<id>).
// $KVRECALL_BENCH_ENGINES picks engines by name (comma separated; the
// floor always runs). Besides quest's variants it has every method of
// issue 14's floor rows: window, retro, retro+heads (heads' synthetic
// "half" profile, as bench speed's --heads-profile half), probe, and
// squeezed (its document must have been ingested with clusters: this
// benchmark's own ingest makes them when squeezed is named, and a bench
// speed document has them when that run's methods included squeezed). They are not in the default list:
// name them.
//
//	KVRECALL_BENCH_MODEL=$PWD/build/models/llama-1b-f16.gguf KVRECALL_BENCH_DATA=/tmp/q1b \
//	    go test ./runtime -run XXX -bench QuestFromDisk -benchtime 40x
func BenchmarkQuestFromDisk(b *testing.B) {
	path := benchModel(b)
	if b.N == 1 {
		// The testing package's first call (b.N 1) before the one that
		// times: its setup alone (a 2048-token floor prefill with 1
		// thread, every session's question) takes a minute at 1b.
		return
	}
	ctx := context.Background()
	contexts := benchContexts(b, 2048, 8192)
	if len(contexts) != 1 {
		b.Fatalf("KVRECALL_BENCH_CONTEXTS: %v: one context", contexts)
	}
	n := contexts[0]
	const room, floorCtx = 512, 2048
	dir := os.Getenv("KVRECALL_BENCH_DATA")
	if dir == "" {
		dir = b.TempDir()
	}
	// squeezed reads clusters made at ingest by a model opened with its
	// options (bench speed opens the decoding model without them).
	var sq *squeezed.Options
	if slices.ContainsFunc(strings.Split(os.Getenv("KVRECALL_BENCH_ENGINES"), ","), func(e string) bool {
		return strings.HasPrefix(strings.TrimSpace(e), "squeezed")
	}) {
		sq = &squeezed.Options{}
	}
	id := fmt.Sprintf("questdisk-hyper-all-%d", n)
	stored := os.Getenv("KVRECALL_BENCH_DOC") // a document already in dir: no ingest
	if stored != "" {
		id = stored
	} else {
		ing, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: n + room, DataDir: dir, Squeezed: sq})
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		doc, err := ing.IngestTokensWith(ctx, id, benchPrompt(n-8, ing.Config().Vocab), runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: hyper.Default()}}, nil)
		if err != nil {
			ing.Close()
			b.Fatal(err)
		}
		b.Logf("document %s: %d tokens, ingested at %s, this call %.1fs", id, n-8, doc.Created.Format(time.RFC3339), time.Since(t0).Seconds())
		ing.Close()
	}
	// One decode thread unless $KVRECALL_BENCH_THREADS says more (bench
	// speed decodes with --threads).
	threads := 1
	if v := os.Getenv("KVRECALL_BENCH_THREADS"); v != "" {
		var err error
		if threads, err = strconv.Atoi(v); err != nil || threads < 1 {
			b.Fatalf("KVRECALL_BENCH_THREADS=%q: a thread count", v)
		}
	}
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: threads, ContextLength: n + room, DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	doc, err := m.OpenDocument(id)
	if err != nil {
		b.Fatal(err)
	}
	// The question and the steps follow the document: tokens from
	// position len(doc) on (the document's own tokens before it).
	n = len(doc.TokenIDs()) + 8
	if n > contexts[0] {
		b.Fatalf("document %s has %d tokens: set KVRECALL_BENCH_CONTEXTS to at least %d", id, n-8, n)
	}
	toks := benchPrompt(n+room, m.Config().Vocab)
	defer func(h bool, r int) { kvcache.HostBounds, kvcache.BoxRowMultiple = h, r }(kvcache.HostBounds, kvcache.BoxRowMultiple)
	type engine struct {
		name        string
		method      string // "" for the dense engine's floor
		extra       map[string]any
		host        bool
		rowMultiple int
		named       bool // runs only when $KVRECALL_BENCH_ENGINES names it
		staged      bool // kvcache.InPlaceRuns off for its steps (on for every other engine's)
		prefetch    int  // kvcache.InPlacePrefetch for its steps (0: the default)
		pergroup    bool // kvcache.InPlaceLayerOp off for its steps: each staged group its own op, as before branch layerop
		split       bool // kvcache.SelectInGraph off for its steps: the pass splits at each selecting layer
	}
	all := []engine{
		{name: "floor"},
		{name: "dense", method: "dense", host: true, rowMultiple: 16},
		{name: "dense2", method: "dense", host: true, rowMultiple: 16}, // a second one, to put before another engine
		{name: "retro", method: "retro", host: true, rowMultiple: 16},
		{name: "window", method: "window", host: true, rowMultiple: 16},
		{name: "quest-before", method: "quest", host: false, rowMultiple: 1},
		{name: "quest", method: "quest", host: true, rowMultiple: 16},
		{name: "quest-graphboxes", method: "quest", host: false, rowMultiple: 16}, // padded rows, box rows copied in the graph
		{name: "quest-hostrows1", method: "quest", host: true, rowMultiple: 1},    // box rows written on the host, rows not padded
		{name: "quest-host", method: "quest", extra: map[string]any{paging.HostScores: true}, host: true, rowMultiple: 16},
		{name: "quest-keepall", method: "quest", extra: map[string]any{paging.KeepLogits: 1e9}, host: true, rowMultiple: 16},
		// Issue 14's other methods, by name only (not in the default list).
		{name: "retro+heads", method: "retro+heads", host: true, rowMultiple: 16, named: true},
		{name: "probe", method: "probe", host: true, rowMultiple: 16, named: true},
		{name: "squeezed", method: "squeezed", host: true, rowMultiple: 16, named: true},
		// squeezed's decode steps attend the ordered copy's runs in place
		// (kvcache.InPlaceRuns, the default; squeezed-inplace is the same
		// engine under the name it had as an opt-in); squeezed-staged
		// copies them into its staging buffers first (issue 14).
		{name: "squeezed-inplace", method: "squeezed", host: true, rowMultiple: 16, named: true},
		{name: "squeezed-staged", method: "squeezed", host: true, rowMultiple: 16, named: true, staged: true},
		{name: "squeezed-pergroup", method: "squeezed", host: true, rowMultiple: 16, named: true, pergroup: true},
		{name: "squeezed-noprefetch", method: "squeezed", host: true, rowMultiple: 16, named: true, prefetch: -1},
		{name: "squeezed-prefetch128", method: "squeezed", host: true, rowMultiple: 16, named: true, prefetch: 128},
		{name: "squeezed-prefetch32", method: "squeezed", host: true, rowMultiple: 16, named: true, prefetch: 32},
		// squeezed's decode steps select inside the graph (one graph a
		// step, kvcache.SelectInGraph, the default); squeezed-split
		// splits the pass at each layer as before.
		{name: "squeezed-split", method: "squeezed", host: true, rowMultiple: 16, named: true, split: true},
		// squeezed's selections in the graph rank from centroid scores
		// computed in the graph by every thread (paging.StepScored, the
		// default); squeezed-hostscore scores the queries on the host,
		// in the selection's callback, on one thread.
		{name: "squeezed-hostscore", method: "squeezed", extra: map[string]any{paging.StepScoresKey: false}, host: true, rowMultiple: 16, named: true},
	}
	engines := pickEngines(b, all, func(e engine) string { return e.name }, func(e engine) bool { return e.named })
	if slices.ContainsFunc(engines, func(e engine) bool { return strings.Contains(e.method, "+heads") }) {
		if err := runtime.ApplyHeadProfile(m, "half"); err != nil {
			b.Fatal(err)
		}
	}
	// The sessions share the document's ordered copies (whichever engine
	// makes them first, in C memory), so the staged and the in-place
	// steps read the same bytes.
	defer func(ip bool, pf int, lo, ig bool) {
		kvcache.InPlaceRuns, kvcache.InPlacePrefetch, kvcache.InPlaceLayerOp, kvcache.SelectInGraph = ip, pf, lo, ig
	}(kvcache.InPlaceRuns, kvcache.InPlacePrefetch, kvcache.InPlaceLayerOp, kvcache.SelectInGraph)
	pf0 := kvcache.InPlacePrefetch
	kvcache.InPlaceRuns = true
	var steps []func() error
	var caches []*kvcache.Paged
	for _, e := range engines {
		kvcache.HostBounds, kvcache.BoxRowMultiple = e.host, e.rowMultiple
		if e.method == "" {
			steps = append(steps, floorStep(ctx, b, m, toks[:floorCtx], toks))
			caches = append(caches, nil)
			continue
		}
		s, step := docStep(ctx, b, m, doc, runtime.PolicyOptions{Policy: e.method, Budget: 2048, Extra: e.extra}, toks, n, e.host, e.rowMultiple)
		ip, pf, ig := !e.staged, pf0, !e.split
		if e.prefetch != 0 {
			pf = max(0, e.prefetch)
		}
		lo := !e.pergroup
		steps = append(steps, func() error {
			kvcache.InPlaceRuns, kvcache.InPlacePrefetch, kvcache.InPlaceLayerOp, kvcache.SelectInGraph = ip, pf, lo, ig
			return step()
		})
		caches = append(caches, s.Cache().(*kvcache.Paged))
	}
	if b.N > room-8 {
		b.Fatalf("-benchtime %dx exceeds the %d steps of room", b.N, room-8)
	}
	up0 := make([]int64, len(caches))
	hw0 := make([]time.Duration, len(caches))
	for j, c := range caches {
		if c != nil {
			up0[j], hw0[j] = c.Stats().UploadedBytes, c.Stats().HostWrites
		}
	}
	if os.Getenv("KVRECALL_BENCH_WARMHEAP") == "1" {
		// The Go heap at its steady state (heapwarm; bench speed does this
		// before its timed steps): else, right after the document is read
		// back, every page a step allocates is a fresh page fault.
		b.Logf("heapwarm: %d MiB touched", heapwarm.Warm()>>20)
	}
	times := make([][]float64, len(steps))
	faults := make([]int64, len(steps))  // minor page faults, summed
	gcs := make([]int64, len(steps))     // Go GC cycles that ended during the step
	allocs := make([]uint64, len(steps)) // Go heap bytes allocated during the step, summed
	var ru syscall.Rusage
	var mst goruntime.MemStats
	b.ResetTimer()
	perfControl(b, "enable")
	// $KVRECALL_BENCH_SHUFFLE=1 draws the order of the engines after the
	// floor at every step, as bench speed does (speed.stepOrder's seeds),
	// and reports each engine's median over the steps it ran right after
	// the "dense" engine and over the others.
	shuffle := os.Getenv("KVRECALL_BENCH_SHUFFLE") == "1"
	afterDense := make([][]float64, len(steps))
	hws := make([][]float64, len(steps)) // host writes per step, ms
	elsewhere := make([][]float64, len(steps))
	// Each engine's steps carry a pprof label (engine=NAME), as in
	// BenchmarkQuestFastPath, so that a -cpuprofile splits by engine.
	labels := make([]context.Context, len(engines))
	for j, e := range engines {
		labels[j] = pprof.WithLabels(ctx, pprof.Labels("engine", e.name))
	}
	// $KVRECALL_BENCH_STEPLOG names a file that gets one line per step,
	// "engine start end faults" (CLOCK_MONOTONIC nanoseconds, minor page
	// faults during the step): with `perf record
	// -k CLOCK_MONOTONIC`, perf's samples split by engine by their time
	// (perf sees C symbols that pprof's labels do not split).
	var steplog *os.File
	if path := os.Getenv("KVRECALL_BENCH_STEPLOG"); path != "" {
		var err error
		if steplog, err = os.Create(path); err != nil {
			b.Fatal(err)
		}
		defer steplog.Close()
	}
	for i := range b.N {
		order := make([]int, len(steps))
		for k := range order {
			order[k] = k
		}
		if shuffle {
			for k, j := range rand.New(rand.NewPCG(uint64(i), 0x6b7672)).Perm(len(steps) - 1) {
				order[k+1] = j + 1
			}
		}
		prev := -1
		for _, j := range order {
			step := steps[j]
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
			f0 := ru.Minflt
			gc0, a0 := gcCount(&mst)
			var hw0 time.Duration
			if caches[j] != nil {
				hw0 = caches[j].Stats().HostWrites
			}
			pprof.SetGoroutineLabels(labels[j])
			m0 := monotonicNs(steplog)
			t0 := time.Now()
			if err := step(); err != nil {
				b.Fatal(err)
			}
			m1 := monotonicNs(steplog)
			pprof.SetGoroutineLabels(ctx)
			if caches[j] != nil {
				hws[j] = append(hws[j], float64(caches[j].Stats().HostWrites-hw0)/float64(time.Millisecond))
			}
			ms := float64(time.Since(t0)) / float64(time.Millisecond)
			times[j] = append(times[j], ms)
			if prev >= 0 && engines[prev].name == "dense" {
				afterDense[j] = append(afterDense[j], ms)
			} else {
				elsewhere[j] = append(elsewhere[j], ms)
			}
			prev = j
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
			faults[j] += ru.Minflt - f0
			if steplog != nil {
				fmt.Fprintf(steplog, "%s %d %d %d\n", engines[j].name, m0, m1, ru.Minflt-f0)
			}
			gc1, a1 := gcCount(&mst)
			gcs[j] += gc1 - gc0
			allocs[j] += a1 - a0
		}
	}
	perfControl(b, "disable")
	b.StopTimer()
	med := medians(times)
	for j, e := range engines {
		b.ReportMetric(med[j], "ms-"+e.name)
		for _, part := range []struct {
			name string
			t    []float64
		}{{"after-dense", afterDense[j]}, {"elsewhere", elsewhere[j]}} {
			if len(part.t) > 0 && len(part.t) < b.N {
				slices.Sort(part.t)
				b.ReportMetric(part.t[len(part.t)/2], "ms-"+e.name+"-"+part.name)
				b.ReportMetric(float64(len(part.t)), e.name+"-"+part.name+"-steps")
			}
		}
		b.ReportMetric(float64(faults[j])/float64(b.N), e.name+"-faults/step")
		b.ReportMetric(float64(gcs[j])/float64(b.N), e.name+"-gc/step")
		b.ReportMetric(float64(allocs[j])/float64(b.N)/1024, e.name+"-allocKiB/step")
		if j > 0 {
			b.ReportMetric(med[j]/med[0], e.name+"/floor")
			up := float64(caches[j].Stats().UploadedBytes-up0[j]) / float64(b.N)
			b.ReportMetric(up/(1<<20), e.name+"-MiB/step")
			hw := caches[j].Stats().HostWrites - hw0[j]
			b.ReportMetric(float64(hw)/float64(time.Millisecond)/float64(b.N), e.name+"-hostwrite-ms/step")
			slices.Sort(hws[j])
			b.ReportMetric(hws[j][len(hws[j])/2], e.name+"-hostwrite-median-ms")
			b.ReportMetric(hws[j][len(hws[j])-1], e.name+"-hostwrite-max-ms")
		}
	}
}

// monotonicNs is CLOCK_MONOTONIC in nanoseconds (perf's -k
// CLOCK_MONOTONIC timestamps), or 0 when log is nil.
func monotonicNs(log *os.File) int64 {
	if log == nil {
		return 0
	}
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

// pickEngines returns the engines of all named in $KVRECALL_BENCH_ENGINES
// (comma separated), after all[0] (the floor, which always runs), or,
// when it is unset, every engine but those named reports true for (they
// run only when named).
func pickEngines[E any](b *testing.B, all []E, name func(E) string, named func(E) bool) []E {
	env := os.Getenv("KVRECALL_BENCH_ENGINES")
	if env == "" {
		return slices.DeleteFunc(slices.Clone(all), named)
	}
	engines := []E{all[0]}
	for _, n := range strings.Split(env, ",") {
		i := slices.IndexFunc(all, func(e E) bool { return name(e) == strings.TrimSpace(n) })
		if i < 0 {
			b.Fatalf("KVRECALL_BENCH_ENGINES: no engine %q", n)
		}
		if i > 0 {
			engines = append(engines, all[i])
		}
	}
	return engines
}

// gcCount is the number of Go GC cycles completed so far and the Go heap
// bytes allocated so far.
func gcCount(ms *goruntime.MemStats) (int64, uint64) {
	goruntime.ReadMemStats(ms)
	return int64(ms.NumGC), ms.TotalAlloc
}
