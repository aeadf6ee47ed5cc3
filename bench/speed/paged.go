package speed

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/bench/plot"
	"github.com/kvrecall/kvrecall/internal/heapwarm"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/probe"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// PagedConfig selects a long-context decode comparison.
type PagedConfig struct {
	Model    string
	Label    string
	Contexts []int
	Threads  int // prefill threads
	// DecodeThreads for the timed decode steps (default 1: on a small
	// machine one thread is the stable setting for single-token steps).
	DecodeThreads int
	Budget        int      // tokens (default 2048)
	Methods       []string // paged methods besides dense (default retro, quest)
	DecodeTokens  int      // default 32
	// HeadProfile is the head profile spec for +heads methods
	// (heads.Resolve); "" uses the model's recorded heads.
	HeadProfile string
	// Hyper, if set, also ingests the document with HyperAttention
	// (runtime.IngestOptions), after the dense ingest, in the same run.
	Hyper *runtime.HyperOptions
	// SkipDense skips the dense ingest (Hyper must be set): decode then
	// reads the HyperAttention ingest's document.
	SkipDense bool
	// SkipLlama skips llama.cpp (its prefill and decode steps): its
	// quadratic prefill takes over 10 minutes at 128k tokens.
	SkipLlama bool
	// Streaming also ingests each document with probe's streaming prefill
	// (runtime.IngestOptions.Streaming, within Budget), timed beside the
	// dense ingest and llama.cpp's prefill of the same tokens. Decode
	// still runs on the densely ingested document.
	Streaming bool
	// Extra is passed to every session's runtime.PolicyOptions.Extra
	// (probe's settings under probe.OptionKey).
	Extra map[string]any
	// Floor, if > 0, also decodes densely at a context of Floor tokens
	// (issue 14's floor: a budget of B tokens reads B tokens of KV, so its
	// physical limit is dense decode at a context of B), in the same
	// alternation as the methods, twice: with the dense engine's cache
	// (ollama's causal cache, what `bench speed` without --paged measures)
	// and with the paged cache under the dense method (the cache machinery
	// every paged method runs through).
	Floor int
	// DataDir, if set, keeps the ingested documents in this folder (one
	// subfolder per model file) instead of a temporary one, and reuses
	// them on later runs: a document of the same tokens, model and ingest
	// (dense, the same HyperAttention layers, streaming) is read back
	// from disk instead of prefilled again (runtime's ingest does so for
	// a stored document of the same text). This makes a 1b-preset 32k
	// row, whose ingest alone takes more than 10 minutes on 2 cores, an
	// ingest once and decode runs of a few minutes afterwards.
	DataDir string
	// Device and GPULayers place the layers of every model the run opens,
	// llama.cpp's too (runtime.Options, DenseConfig).
	Device    string
	GPULayers int
	Log       func(format string, args ...any)
}

// PagedRow is one context length.
type PagedRow struct {
	Model   string `json:"model"`
	Context int    `json:"context"`
	Threads int    `json:"threads"`
	Budget  int    `json:"budget"`
	// Decode ms/token per method ("dense" is our engine with every page,
	// "llama.cpp" the reference), and device-resident KV bytes.
	DecodeMs map[string]float64 `json:"decode_ms_token"`
	Resident map[string]int64   `json:"resident_kv_bytes"`
	// ResidentByClass splits each method's resident KV by head class.
	ResidentByClass map[string]map[string]int64 `json:"resident_kv_bytes_by_class"`
	// Summaries is each method's page summaries scored in the graph
	// (kvcache.Stats.SummaryBytes: quest's boxes, squeezed's centroids):
	// backend memory beside the resident KV that grows with the document.
	Summaries map[string]int64 `json:"summary_bytes,omitempty"`
	// BaseMs is our decode time at a 256-token context: the non-attention
	// cost that AttentionMs subtracts.
	BaseMs float64 `json:"base_ms_token"`
	// Prefill of the document (dense attention through the paged cache),
	// and the share of it spent on host pages and summaries.
	PrefillSec float64 `json:"prefill_seconds"`
	UpkeepSec  float64 `json:"upkeep_seconds"`
	// ClusterSec is the time the ingest spent clustering keys (only when a
	// squeezed method is benchmarked), after the prefill.
	ClusterSec    float64 `json:"cluster_seconds,omitempty"`
	LlamaPrefillS float64 `json:"llamacpp_prefill_seconds"`
	// LlamaSWAPrefillS is llama.cpp's prefill with window-sized caches for
	// sliding-window layers (0: no such layers, or llama.cpp skipped).
	LlamaSWAPrefillS float64 `json:"llamacpp_swa_prefill_seconds,omitempty"`
	// HyperPrefillSec is the HyperAttention ingest's prefill (0: not run).
	// With SkipDense, PrefillSec is 0 and decode reads that document.
	HyperPrefillSec float64 `json:"hyper_prefill_seconds,omitempty"`
	// PeakRSS is each prefill's peak memory: the process's resident-set
	// high-water mark during the ingest (or llama.cpp's prefill) minus its
	// resident set just before it (VmHWM reset through
	// /proc/self/clear_refs; weights and the engine are loaded before).
	// Keys: "dense", "hyper", "llama.cpp".
	PeakRSS map[string]int64 `json:"peak_rss_delta_bytes,omitempty"`
	// IngestSec is the dense ingest's wall time (prefill, page upkeep and
	// saving), StreamingIngestSec the streaming prefill's (with its probe
	// representatives, which a dense document computes at its first probe
	// question), when PagedConfig.Streaming.
	IngestSec          float64 `json:"ingest_seconds,omitempty"`
	StreamingIngestSec float64 `json:"streaming_ingest_seconds,omitempty"`
	// ProbeRepsSec is the time the decoded document's ingest spent building
	// probe's representatives (IngestOptions.ProbeReps, when a probe method
	// is measured), inside its prefill time (PrefillSec, or
	// HyperPrefillSec with SkipDense).
	ProbeRepsSec float64 `json:"probe_reps_seconds,omitempty"`
	// OpenSec is, per method, the wall time of opening its session on the
	// document and evaluating the question: probe's includes reading (or,
	// for a document ingested without them, computing by a second dense
	// prefill) its representatives.
	OpenSec map[string]float64 `json:"session_open_seconds,omitempty"`
	// Reused lists the ingests ("dense", "hyper", "streaming") whose
	// stored document a DataDir run read back instead of prefilling; their
	// prefill times are the original ingest's.
	Reused []string `json:"reused_ingests,omitempty"`
	// LayerBudgets are the tokens each layer attended to for the question,
	// for methods with a per-request cut-off (probe).
	LayerBudgets map[string][]int `json:"layer_budgets,omitempty"`
	// Attended is the KV bytes the last timed decode step attended to,
	// per method: the selected tokens of every layer and head group, K
	// and V (a page-granular method's whole selected pages).
	Attended map[string]int64 `json:"attended_kv_bytes,omitempty"`
	// UploadedPerStep is the KV bytes copied host -> device per timed
	// decode step, per method (their mean).
	UploadedPerStep map[string]float64 `json:"uploaded_kv_bytes_per_step,omitempty"`
	// StagedShare is the share of the timed steps' page uploads that went
	// through device staging tensors (kvcache.DeviceUploads: pools outside
	// host memory, a GPU's), per method that uploaded pages; Staging is
	// those tensors' bytes, beside the resident KV.
	StagedShare map[string]float64 `json:"device_staged_share,omitempty"`
	Staging     map[string]int64   `json:"staging_bytes,omitempty"`
	// HostKV is each method's host pages after the timed steps (the
	// document's shared pages included), and "document" the document's.
	// A model with sliding-window layers keeps only their window there.
	HostKV map[string]int64 `json:"host_kv_bytes,omitempty"`
	// HostKVFull is what the document's host pages would be if every
	// layer kept every page (0 for a model without windowed layers).
	HostKVFull int64 `json:"host_kv_full_bytes,omitempty"`
	// Floor is PagedConfig.Floor (0: not measured); FloorMs is dense
	// decode at a context of Floor tokens through the dense engine's
	// cache, FloorPagedMs through the paged cache (dense method), both
	// timed in the same alternation as DecodeMs.
	Floor        int     `json:"floor_context,omitempty"`
	FloorMs      float64 `json:"floor_ms_token,omitempty"`
	FloorPagedMs float64 `json:"floor_paged_ms_token,omitempty"`
}

// llamaSWA is the key of llama.cpp run with window-sized caches for
// sliding-window layers (swa_full = false, its CLI's default); plain
// "llama.cpp" is the C API's default, full-size caches.
const llamaSWA = "llama.cpp swa"

// ClusterShare is the clustering time (squeezed methods) as a fraction of
// the prefill of the document it clustered (the HyperAttention ingest's
// with SkipDense).
func (r PagedRow) ClusterShare() float64 { return r.ClusterSec / r.clusteredPrefill() }

func (r PagedRow) clusteredPrefill() float64 {
	if r.PrefillSec == 0 {
		return r.HyperPrefillSec
	}
	return r.PrefillSec
}

// AttentionMs estimates attention time per token: decode time minus the
// decode time at a 256-token context.
func (r PagedRow) AttentionMs(method string) float64 { return max(0, r.DecodeMs[method]-r.BaseMs) }

// UpkeepShare is the fraction of prefill spent keeping pages and summaries.
func (r PagedRow) UpkeepShare() float64 { return r.UpkeepSec / r.PrefillSec }

// RunPaged ingests a document of each length once, then decodes under every
// method and in llama.cpp, alternating single-token steps between them.
func RunPaged(ctx context.Context, c PagedConfig) ([]PagedRow, error) {
	if c.Budget == 0 {
		c.Budget = 2048
	}
	if len(c.Methods) == 0 {
		c.Methods = []string{"retro", "quest"}
	}
	if c.DecodeTokens == 0 {
		c.DecodeTokens = 32
	}
	if c.DecodeThreads == 0 {
		c.DecodeThreads = 1
	}
	logf := c.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	var rows []PagedRow
	for _, n := range c.Contexts {
		row, err := pagedOne(ctx, c, n, logf)
		if err != nil {
			return rows, err
		}
		rows = append(rows, row)
	}
	return rows, nil
}

func pagedOne(ctx context.Context, c PagedConfig, n int, logf func(string, ...any)) (PagedRow, error) {
	row := PagedRow{Model: c.Label, Context: n, Threads: c.DecodeThreads, Budget: c.Budget,
		DecodeMs: map[string]float64{}, Resident: map[string]int64{}, ResidentByClass: map[string]map[string]int64{}, Summaries: map[string]int64{},
		Attended: map[string]int64{}, UploadedPerStep: map[string]float64{}, HostKV: map[string]int64{},
		StagedShare: map[string]float64{}, Staging: map[string]int64{}}
	capacity := n + 64 + c.DecodeTokens
	var dir string
	if c.DataDir != "" {
		// One folder per model file: a document's pages belong to the
		// model that made them.
		dir = filepath.Join(c.DataDir, strings.TrimSuffix(filepath.Base(c.Model), filepath.Ext(c.Model)))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return row, fmt.Errorf("speed: data folder: %w", err)
		}
	} else {
		var err error
		if dir, err = os.MkdirTemp("", "kvrecall-speed-"); err != nil {
			return row, err
		}
		defer os.RemoveAll(dir)
	}
	// A squeezed method needs the document's clusters, made at ingest; a
	// probe method its representatives, made at a HyperAttention ingest
	// when decode reads that document (else at its first question, by a
	// second dense prefill of the document).
	var sq *squeezed.Options
	probeReps := false
	for _, meth := range c.Methods {
		if strings.HasPrefix(meth, "squeezed") {
			sq = &squeezed.Options{}
		}
		if strings.HasPrefix(meth, "probe") {
			probeReps = true
		}
	}
	var probeSettings probe.Settings
	switch v := c.Extra[probe.OptionKey].(type) {
	case probe.Settings:
		probeSettings = v
	case *probe.Settings:
		if v != nil {
			probeSettings = *v
		}
	}
	if c.Floor < 0 || c.Floor > n {
		return row, fmt.Errorf("speed: floor context %d is outside 1..%d (the context)", c.Floor, n)
	}
	row.Floor = c.Floor
	if c.SkipDense && c.Hyper == nil {
		return row, fmt.Errorf("speed: skipping the dense ingest needs a HyperAttention ingest (--hyper)")
	}
	row.PeakRSS = map[string]int64{}
	var toks, question []int32
	// ingest prefills the document under id in a model of its own, and
	// measures its peak memory above what the loaded model holds.
	// wall is the ingest's wall time (prefill, page upkeep, saving, and a
	// streaming ingest's probe representatives).
	var wall float64
	ingest := func(id string, o runtime.IngestOptions, how string) (*runtime.Document, error) {
		ingester, err := runtime.Open(ctx, c.Model, runtime.Options{Threads: c.Threads, ContextLength: capacity, DataDir: dir, Squeezed: sq, Device: c.Device, GPULayers: c.GPULayers})
		if err != nil {
			return nil, err
		}
		defer ingester.Close()
		toks = prompt(n, ingester.Config().Vocab)
		question = prompt(n+8, ingester.Config().Vocab)[n:]
		logf("%s %d: ingest (%s)", c.Label, n, how)
		peak := startPeak()
		t0 := time.Now()
		doc, err := ingester.IngestTokensWith(ctx, id, toks, o, nil)
		if err != nil {
			return nil, err
		}
		wall = time.Since(t0).Seconds()
		kind := how[:strings.Index(how+" ", " ")]
		if doc.Created.Before(t0) {
			// Stored by an earlier run (DataDir): read back, not prefilled.
			row.Reused = append(row.Reused, kind)
			logf("%s %d: reused the stored document %s (ingested %s, prefill %.1fs then), read back in %.1fs",
				c.Label, n, id, doc.Created.Format(time.RFC3339), doc.PrefillSeconds, wall)
			// No ingest was timed: the read-back time in the ingest
			// columns would make the streaming table's ratios meaningless.
			wall = 0
			return doc, nil
		}
		row.PeakRSS[kind] = peak()
		return doc, nil
	}
	// Document ids name the length and the ingest, so that a DataDir
	// holds one document per length and ingest kind.
	docID := fmt.Sprintf("speed-%d", n)
	if !c.SkipDense {
		// Decode reads this document: with a probe method it gets probe's
		// representatives at its ingest (the prefill then hands every
		// layer's queries to the host: PrefillSec includes that and
		// ProbeRepsSec), not from a second dense prefill at the first
		// probe session.
		doc, err := ingest(docID, runtime.IngestOptions{ProbeReps: probeReps, Probe: probeSettings},
			fmt.Sprintf("dense prefill through the paged cache, probe representatives %v", probeReps))
		if err != nil {
			return row, err
		}
		row.PrefillSec, row.UpkeepSec, row.ClusterSec = doc.PrefillSeconds, doc.UpkeepSeconds, doc.ClusterSeconds
		row.ProbeRepsSec = doc.ProbeRepsSeconds
		row.IngestSec = wall
	}
	if c.Hyper != nil {
		hyperID := fmt.Sprintf("speed-hyper-all-%d", n)
		if len(c.Hyper.Layers) > 0 {
			hyperID = fmt.Sprintf("speed-hyper-%s-%d", strings.Trim(strings.Join(strings.Fields(fmt.Sprint(c.Hyper.Layers)), "."), "[]"), n)
		}
		// The document decode reads gets probe's representatives at its
		// ingest: computing them at the first probe session would prefill
		// it densely once more (over 30 minutes at 128k tokens).
		reps := probeReps && c.SkipDense
		doc, err := ingest(hyperID, runtime.IngestOptions{Hyper: c.Hyper, ProbeReps: reps, Probe: probeSettings},
			fmt.Sprintf("hyper prefill, HyperAttention on layers %v (all if empty), probe representatives %v", c.Hyper.Layers, reps))
		if err != nil {
			return row, err
		}
		row.HyperPrefillSec = doc.PrefillSeconds
		if c.SkipDense {
			docID = hyperID
			row.UpkeepSec, row.ClusterSec, row.ProbeRepsSec = doc.UpkeepSeconds, doc.ClusterSeconds, doc.ProbeRepsSeconds
		}
	}
	if c.Streaming {
		if _, err := ingest(fmt.Sprintf("speed-streaming-%d-b%d", n, c.Budget), runtime.IngestOptions{Streaming: true, Budget: c.Budget},
			fmt.Sprintf("streaming prefill under probe, budget %d", c.Budget)); err != nil {
			return row, fmt.Errorf("streaming ingest: %w", err)
		}
		row.StreamingIngestSec = wall
	}

	// Decode with its own thread count: the document comes back from disk.
	m, err := runtime.Open(ctx, c.Model, runtime.Options{Threads: c.DecodeThreads, ContextLength: capacity, DataDir: dir, Device: c.Device, GPULayers: c.GPULayers})
	if err != nil {
		return row, err
	}
	defer m.Close()
	if err := runtime.ApplyHeadProfile(m, c.HeadProfile); err != nil {
		return row, err
	}
	doc, err := m.OpenDocument(docID)
	if err != nil {
		return row, err
	}

	// Non-attention cost: decode at a short context, dense.
	short, err := m.NewSession()
	if err != nil {
		return row, err
	}
	if _, err := short.Eval(ctx, toks[:256], false, nil); err != nil {
		return row, err
	}
	var base []time.Duration
	for i := 0; i < c.DecodeTokens; i++ {
		t0 := time.Now()
		if _, err := short.Eval(ctx, toks[256+i:257+i], false, nil); err != nil {
			return row, err
		}
		base = append(base, time.Since(t0))
	}
	short.Close()
	row.BaseMs = median(base)

	var ref *llamaref.Model
	if !c.SkipLlama {
		logf("%s %d: llama.cpp prefill", c.Label, n)
		if ref, err = llamaref.Load(c.Model, llamaref.Options{Threads: c.DecodeThreads, BatchThreads: c.Threads, Context: capacity, Device: llamaDeviceName(m.Device()), GPULayers: llamaGPULayers(m.Device(), c.GPULayers)}); err != nil {
			return row, err
		}
		defer ref.Close()
		peak := startPeak()
		t0 := time.Now()
		if _, err := ref.Append(toks, false, nil); err != nil {
			return row, err
		}
		row.LlamaPrefillS = time.Since(t0).Seconds()
		row.PeakRSS["llama.cpp"] = peak()
		if _, err := ref.Append(question, false, nil); err != nil {
			return row, err
		}
	}
	// With sliding-window layers, also llama.cpp as its CLI runs it:
	// window-sized caches for those layers.
	var refSWA *llamaref.Model
	if cfg := m.Config(); !c.SkipLlama && cfg.SlidingWindow > 0 {
		logf("%s %d: llama.cpp prefill, window-sized SWA caches", c.Label, n)
		if refSWA, err = llamaref.Load(c.Model, llamaref.Options{Threads: c.DecodeThreads, BatchThreads: c.Threads, Context: capacity, SWAWindow: true, Device: llamaDeviceName(m.Device()), GPULayers: llamaGPULayers(m.Device(), c.GPULayers)}); err != nil {
			return row, err
		}
		defer refSWA.Close()
		peak := startPeak()
		t0 := time.Now()
		if _, err := refSWA.Append(toks, false, nil); err != nil {
			return row, err
		}
		row.LlamaSWAPrefillS = time.Since(t0).Seconds()
		row.PeakRSS[llamaSWA] = peak()
		logf("%s %d: llama.cpp (window-sized SWA caches) prefill %.1fs", c.Label, n, row.LlamaSWAPrefillS)
		if _, err := refSWA.Append(question, false, nil); err != nil {
			return row, err
		}
	}

	methods := append([]string{"dense"}, c.Methods...)
	sessions := make([]*runtime.Session, len(methods))
	row.OpenSec = map[string]float64{}
	for i, meth := range methods {
		t0 := time.Now()
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: meth, Budget: c.Budget, Extra: c.Extra})
		if err != nil {
			return row, err
		}
		defer s.Close()
		if _, err := s.Eval(ctx, question, false, nil); err != nil {
			return row, fmt.Errorf("%s: %w", meth, err)
		}
		row.OpenSec[meth] = time.Since(t0).Seconds()
		logf("%s %d: %s session opened and question read in %.2fs", c.Label, n, meth, row.OpenSec[meth])
		if lb := s.LayerBudgets(); lb != nil {
			if row.LayerBudgets == nil {
				row.LayerBudgets = map[string][]int{}
			}
			row.LayerBudgets[meth] = lb
		}
		sessions[i] = s
	}
	// The floor sessions: the document's first Floor tokens, prefilled
	// with the decode threads (one pass per batch, untimed), then the
	// same question, so that they decode at a context of Floor+8 tokens
	// as the methods decode after their question.
	var floors []*runtime.Session
	if c.Floor > 0 {
		logf("%s %d: floor prefill (%d tokens, dense engine and paged dense)", c.Label, n, c.Floor)
		for _, f := range []runtime.CacheFactory{runtime.DenseCache, runtime.PagedCache(runtime.PolicyOptions{Policy: "dense"})} {
			s, err := m.NewSessionWith(f)
			if err != nil {
				return row, fmt.Errorf("floor: %w", err)
			}
			defer s.Close()
			if _, err := s.Eval(ctx, append(slices.Clone(toks[:c.Floor]), question...), false, nil); err != nil {
				return row, fmt.Errorf("floor: %w", err)
			}
			floors = append(floors, s)
		}
	}
	// The Go heap at its steady state before the timed steps: right after
	// the document is read back (and its ingest's buffers freed and
	// returned to the OS), every page a paged step allocates is a fresh
	// page fault, ~10–15 µs each here, which a serving process whose heap
	// has cycled does not pay. The dense engine's kept step graph
	// allocates 2.4 KiB a step; paged steps, with their kept graphs,
	// 11–20 KiB at tiny 64k and ~200 KiB at 1b (before those graphs
	// quest allocated ~93 KiB at tiny 64k and paid ~0.2–0.5 ms a step for
	// it: docs/kvcache.md, "quest at 64k"). The cold state, what a freshly
	// loaded process pays until its first GC, is BenchmarkQuestFromDisk's.
	logf("%s %d: Go heap warmed, %d MiB touched", c.Label, n, heapwarm.Warm()>>20)
	steps := make([][]time.Duration, len(methods)+2)
	floorSteps := make([][]time.Duration, len(floors))
	uploaded := make([]int64, len(methods)) // before the timed steps
	pageUps, staged := make([]int64, len(methods)), make([]int64, len(methods))
	for j, s := range sessions {
		st := s.Cache().(*kvcache.Paged).Stats()
		uploaded[j], pageUps[j], staged[j] = st.UploadedBytes, st.Uploads, st.DeviceStaged
	}
	for i := 0; i < c.DecodeTokens; i++ {
		tok := toks[i : i+1]
		for j, s := range floors {
			t0 := time.Now()
			if _, err := s.Eval(ctx, tok, false, nil); err != nil {
				return row, fmt.Errorf("floor: %w", err)
			}
			floorSteps[j] = append(floorSteps[j], time.Since(t0))
		}
		for _, j := range stepOrder(i, len(sessions)) {
			s := sessions[j]
			t0 := time.Now()
			if _, err := s.Eval(ctx, tok, false, nil); err != nil {
				return row, fmt.Errorf("%s: %w", methods[j], err)
			}
			steps[j] = append(steps[j], time.Since(t0))
		}
		for j, r := range []*llamaref.Model{ref, refSWA} {
			if r == nil {
				continue
			}
			t0 := time.Now()
			if _, err := r.Append(tok, false, nil); err != nil {
				return row, err
			}
			steps[len(methods)+j] = append(steps[len(methods)+j], time.Since(t0))
		}
	}
	for j, meth := range methods {
		row.DecodeMs[meth] = median(steps[j])
		st := sessions[j].Cache().(*kvcache.Paged).Stats()
		// Staged token groups' buffers (kvcache.TokenStaging) are pools of
		// the budget's size, in ResidentBytes; their document's ordered
		// copies are document memory (Stats.OrderedBytes), not resident.
		row.Resident[meth], row.ResidentByClass[meth] = st.ResidentBytes, st.ResidentByClass
		row.Summaries[meth] = st.SummaryBytes
		row.Attended[meth] = st.AttendedBytes
		row.UploadedPerStep[meth] = float64(st.UploadedBytes-uploaded[j]) / float64(c.DecodeTokens)
		if ups := st.Uploads - pageUps[j]; ups > 0 && st.StagingBytes > 0 {
			row.StagedShare[meth] = float64(st.DeviceStaged-staged[j]) / float64(ups)
			row.Staging[meth] = st.StagingBytes
			logf("%s %d: %s: %.0f%% of the steps' %d page uploads through device staging (%s of staging tensors)",
				c.Label, n, meth, 100*row.StagedShare[meth], ups, mib(st.StagingBytes))
		}
		row.HostKV[meth] = st.HostBytes
	}
	row.HostKV["document"] = doc.Store().Bytes()
	cfg := m.Config()
	if cfg.SlidingWindow > 0 {
		row.HostKVFull = int64(doc.Store().Pages()) * int64(cfg.Layers) * int64(m.Layout().PageBytes())
	}
	if len(floors) == 2 {
		row.FloorMs, row.FloorPagedMs = median(floorSteps[0]), median(floorSteps[1])
		logf("%s %d: floor at %d tokens: %.2f ms/token (dense engine), %.2f (paged dense)", c.Label, n, c.Floor, row.FloorMs, row.FloorPagedMs)
	}
	if ref != nil {
		row.DecodeMs["llama.cpp"] = median(steps[len(methods)])
		row.Resident["llama.cpp"] = int64(capacity) * int64(cfg.KVBytesPerToken(2))
	}
	if refSWA != nil {
		// llama.cpp's iswa cache: n_ctx cells for global layers,
		// pad(min(n_ctx, n_swa + n_ubatch), 256) for windowed ones.
		perLayer := int64(cfg.KVBytesPerToken(2) / cfg.Layers)
		swaCells := int64(min(capacity, cfg.SlidingWindow+512)+255) / 256 * 256
		w := int64(len(cfg.WindowedLayers()))
		row.DecodeMs[llamaSWA] = median(steps[len(methods)+1])
		row.Resident[llamaSWA] = perLayer * ((int64(cfg.Layers)-w)*int64(capacity) + w*swaCells)
	}
	logf("%s %d: decode ms/token %v (base %.2f), prefill %.1fs (upkeep %.1f%%), hyper prefill %.1fs, llama.cpp prefill %.1fs, peak RSS delta %v",
		c.Label, n, row.DecodeMs, row.BaseMs, row.PrefillSec, 100*row.UpkeepShare(), row.HyperPrefillSec, row.LlamaPrefillS, row.PeakRSS)
	if row.StreamingIngestSec > 0 {
		logf("%s %d: ingest %.1fs dense, %.1fs streaming", c.Label, n, row.IngestSec, row.StreamingIngestSec)
	}
	if row.ProbeRepsSec > 0 {
		logf("%s %d: probe representatives built at the ingest in %.1fs (%.1f%% of its prefill)", c.Label, n, row.ProbeRepsSec, 100*row.ProbeRepsSec/row.clusteredPrefill())
	}
	for meth, lb := range row.LayerBudgets {
		logf("%s %d: %s per-layer budgets %v", c.Label, n, meth, lb)
	}
	if row.ClusterSec > 0 {
		logf("%s %d: clustering %.2fs = %.1f%% of the prefill", c.Label, n, row.ClusterSec, 100*row.ClusterShare())
	}
	return row, nil
}

// stepOrder is the order in which n method sessions take decode step i:
// a permutation drawn from a generator seeded with i (the same in every
// run), so that no method always runs right after the same neighbour. On
// the 1b preset the step after the dense session's (which reads the whole
// document's KV, 1 GiB at 32k) ran 15–90 ms slower whatever its method
// (retro 1.47x the floor right after it, 0.97–1.01x elsewhere in the same
// runs: BenchmarkQuestFromDisk, docs/performance.md "quest at 1b: the step
// after the dense one"). With a fixed order that cost landed on the same
// method at every step and decided its median; drawn, it lands on a
// method in about one step of n-1.
func stepOrder(i, n int) []int {
	return rand.New(rand.NewPCG(uint64(i), 0x6b7672)).Perm(n)
}

// startPeak resets the process's resident-set high-water mark (Linux:
// "5" to /proc/self/clear_refs) and returns a function that reports the
// mark since then minus the resident set now: the peak memory of what runs
// in between. Where the files are missing it reports -1.
func startPeak() func() int64 {
	rss0 := procStatus("VmRSS")
	if rss0 < 0 || os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) != nil {
		return func() int64 { return -1 }
	}
	return func() int64 {
		hwm := procStatus("VmHWM")
		if hwm < 0 {
			return -1
		}
		return hwm - rss0
	}
}

// procStatus reads a "kB" field of /proc/self/status in bytes, or -1.
func procStatus(field string) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, field+":"); ok {
			var kb int64
			if _, err := fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), &kb); err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}

// PagedTable formats rows as Markdown: decode time per method with ratios
// against our dense attention and llama.cpp, attention time, resident KV and
// upkeep share.
func PagedTable(rows []PagedRow, methods []string) string {
	s := "| model | context | budget | method | decode ms/token | speedup vs dense (ours) | speedup vs llama.cpp | attention ms/token | attention reduction vs dense | resident KV |\n"
	s += "|---|---|---|---|---|---|---|---|---|---|\n"
	for _, r := range rows {
		for _, m := range append([]string{"llama.cpp", llamaSWA, "dense"}, methods...) {
			ms, ok := r.DecodeMs[m]
			if !ok { // llama.cpp skipped, or no windowed layers
				continue
			}
			vsLlama := "—"
			if l := r.DecodeMs["llama.cpp"]; l > 0 {
				vsLlama = fmt.Sprintf("%.2f", l/ms)
			}
			att := "—"
			attRatio := "—"
			if !strings.HasPrefix(m, "llama.cpp") {
				att = fmt.Sprintf("%.2f", r.AttentionMs(m))
				if a := r.AttentionMs(m); a > 0 {
					attRatio = fmt.Sprintf("%.1fx", r.AttentionMs("dense")/a)
				}
			}
			s += fmt.Sprintf("| %s | %d | %d | %s | %.2f | %.2f | %s | %s | %s | %s |\n",
				r.Model, r.Context, r.Budget, m, ms, r.DecodeMs["dense"]/ms, vsLlama, att, attRatio, mib(r.Resident[m]))
		}
	}
	s += "\n" + PrefillTable(rows)
	s += LayerBudgetTable(rows, methods)
	s += windowedKVTable(rows, methods)
	s += FloorTable(rows, methods)
	return s + kvTrafficTable(rows, methods)
}

// windowedKVTable splits resident KV of models with sliding-window layers
// by layer type (device pools of windowed and of global layers) and adds
// the host pages, against what every page of every layer would take; ""
// when no row has windowed layers.
func windowedKVTable(rows []PagedRow, methods []string) string {
	s := ""
	for _, r := range rows {
		if r.HostKVFull == 0 {
			continue
		}
		if s == "" {
			s = fmt.Sprintf("\nllama.cpp with window-sized SWA caches: prefill %.1f s\n", r.LlamaSWAPrefillS)
			s += "\n| model | context | method | device KV, windowed layers | device KV, global layers | host KV (session) | host KV (document) | host KV if every layer kept every page |\n|---|---|---|---|---|---|---|---|\n"
		}
		for _, m := range append([]string{"dense"}, methods...) {
			w := r.ResidentByClass[m]["windowed"]
			s += fmt.Sprintf("| %s | %d | %s | %s | %s | %s | %s | %s |\n", r.Model, r.Context, m, mib(w), mib(r.Resident[m]-w),
				mib(r.HostKV[m]), mib(r.HostKV["document"]), mib(r.HostKVFull))
		}
	}
	return s
}

// FloorTable compares each method's decode time with the floor measured in
// the same run (issue 14): dense decode at a context of the floor's tokens,
// through the dense engine's cache and through the paged cache. It is ""
// when no row measured a floor.
func FloorTable(rows []PagedRow, methods []string) string {
	s := ""
	for _, r := range rows {
		if r.Floor == 0 || r.FloorMs <= 0 {
			continue
		}
		if s == "" {
			s = "\n| model | context | budget | floor context | method | decode ms/token | vs floor (dense engine) | vs floor (paged dense) |\n|---|---|---|---|---|---|---|---|\n"
		}
		s += fmt.Sprintf("| %s | %d | %d | %d | floor (dense engine) | %.2f | 1.00 | %.2f |\n", r.Model, r.Context, r.Budget, r.Floor, r.FloorMs, r.FloorMs/r.FloorPagedMs)
		s += fmt.Sprintf("| %s | %d | %d | %d | floor (paged dense) | %.2f | %.2f | 1.00 |\n", r.Model, r.Context, r.Budget, r.Floor, r.FloorPagedMs, r.FloorPagedMs/r.FloorMs)
		for _, m := range append([]string{"llama.cpp", "dense"}, methods...) {
			ms, ok := r.DecodeMs[m]
			if !ok {
				continue
			}
			s += fmt.Sprintf("| %s | %d | %d | %d | %s | %.2f | %.2f | %.2f |\n", r.Model, r.Context, r.Budget, r.Floor, m, ms, ms/r.FloorMs, ms/r.FloorPagedMs)
		}
	}
	return s
}

// PrefillTable formats the ingests of rows as Markdown: dense (our paged
// ingest), HyperAttention and llama.cpp prefill times, their ratios and
// peak memory. "—" marks what the run skipped.
func PrefillTable(rows []PagedRow) string {
	sec := func(x float64) string {
		if x <= 0 {
			return "—"
		}
		return fmt.Sprintf("%.1f", x)
	}
	ratio := func(a, b float64) string {
		if a <= 0 || b <= 0 {
			return "—"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	peak := func(r PagedRow, k string) string {
		b, ok := r.PeakRSS[k]
		if !ok || b < 0 {
			return "—"
		}
		return mib(b)
	}
	s := "| model | context | prefill s (kvrecall, paged ingest) | prefill s (hyper) | prefill s (llama.cpp) | dense / llama.cpp time | llama.cpp / hyper (hyper speed-up) | dense / hyper (hyper speed-up) | peak RSS delta dense | peak RSS delta hyper | peak RSS delta llama.cpp | summary upkeep share |\n"
	s += "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
	for _, r := range rows {
		upkeep := "—"
		if r.PrefillSec > 0 {
			upkeep = fmt.Sprintf("%.2f%%", 100*r.UpkeepShare())
		}
		s += fmt.Sprintf("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Model, r.Context,
			sec(r.PrefillSec), sec(r.HyperPrefillSec), sec(r.LlamaPrefillS),
			ratio(r.PrefillSec, r.LlamaPrefillS), ratio(r.LlamaPrefillS, r.HyperPrefillSec), ratio(r.PrefillSec, r.HyperPrefillSec),
			peak(r, "dense"), peak(r, "hyper"), peak(r, "llama.cpp"), upkeep)
	}
	if slices.ContainsFunc(rows, func(r PagedRow) bool { return r.StreamingIngestSec > 0 }) {
		s += "\n| model | context | budget | dense ingest s | streaming ingest s | llama.cpp prefill s | streaming vs dense | streaming vs llama.cpp |\n|---|---|---|---|---|---|---|---|\n"
		for _, r := range rows {
			if r.StreamingIngestSec > 0 && r.IngestSec > 0 {
				s += fmt.Sprintf("| %s | %d | %d | %.1f | %.1f | %.1f | %.2fx | %.2fx |\n", r.Model, r.Context, r.Budget, r.IngestSec, r.StreamingIngestSec, r.LlamaPrefillS,
					r.IngestSec/r.StreamingIngestSec, r.LlamaPrefillS/r.StreamingIngestSec)
			}
		}
	}
	return s
}

// LayerBudgetTable lists the per-layer budgets (tokens attended for the
// question, layer 0 first) of the methods that report them (probe), or ""
// when none does.
func LayerBudgetTable(rows []PagedRow, methods []string) string {
	s := ""
	for _, r := range rows {
		for _, m := range methods {
			lb, ok := r.LayerBudgets[m]
			if !ok {
				continue
			}
			if s == "" {
				s = "\n| model | context | method | budget | per-layer budgets (layer 0 first) | mean |\n|---|---|---|---|---|---|\n"
			}
			sum := 0
			parts := make([]string, len(lb))
			for i, b := range lb {
				parts[i] = fmt.Sprint(b)
				sum += b
			}
			s += fmt.Sprintf("| %s | %d | %s | %d | %s | %.0f |\n", r.Model, r.Context, m, r.Budget, strings.Join(parts, ", "), float64(sum)/float64(max(1, len(lb))))
		}
	}
	return s
}

// kvTrafficTable is, per method, the KV a decode step attends to against
// what is device-resident and what it uploads; and, when a squeezed method
// clustered the document, the clustering's share of the ingest.
func kvTrafficTable(rows []PagedRow, methods []string) string {
	if len(rows) == 0 || rows[0].Attended == nil {
		return ""
	}
	s := "\n| model | context | method | attended KV per step | resident KV | attended / resident | uploaded per step | scored summaries (beside resident) |\n|---|---|---|---|---|---|---|---|\n"
	clustered := false
	for _, r := range rows {
		clustered = clustered || r.ClusterSec > 0
		for _, m := range append([]string{"dense"}, methods...) {
			ratio := "—"
			if r.Resident[m] > 0 {
				ratio = fmt.Sprintf("%.2f", float64(r.Attended[m])/float64(r.Resident[m]))
			}
			s += fmt.Sprintf("| %s | %d | %s | %s | %s | %s | %s | %s |\n", r.Model, r.Context, m, mib(r.Attended[m]), mib(r.Resident[m]), ratio, mib(int64(r.UploadedPerStep[m])), mib(r.Summaries[m]))
		}
	}
	if !clustered {
		return s
	}
	s += "\n| model | context | prefill s | clustering s (squeezed, at ingest) | clustering share of prefill |\n|---|---|---|---|---|\n"
	for _, r := range rows {
		s += fmt.Sprintf("| %s | %d | %.1f | %.2f | %.1f%% |\n", r.Model, r.Context, r.clusteredPrefill(), r.ClusterSec, 100*r.ClusterShare())
	}
	return s
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// PagedPlots draws decode time and resident KV against context length, one
// line per method (llama.cpp included), for each model, into dir.
func PagedPlots(rows []PagedRow, methods []string, dir string) error {
	byModel := map[string][]PagedRow{}
	var models []string
	for _, r := range rows {
		if _, ok := byModel[r.Model]; !ok {
			models = append(models, r.Model)
		}
		byModel[r.Model] = append(byModel[r.Model], r)
	}
	for _, model := range models {
		rs := byModel[model]
		var dec, res []plot.Series
		for _, m := range append([]string{"llama.cpp", "dense"}, methods...) {
			d := plot.Series{Name: m}
			k := plot.Series{Name: m}
			for _, r := range rs {
				if _, ok := r.DecodeMs[m]; !ok { // llama.cpp skipped
					continue
				}
				x := float64(r.Context) / 1024
				d.X, d.Y = append(d.X, x), append(d.Y, r.DecodeMs[m])
				k.X, k.Y = append(k.X, x), append(k.Y, float64(r.Resident[m])/(1<<20))
			}
			if len(d.X) > 0 {
				dec, res = append(dec, d), append(res, k)
			}
		}
		// A --model label is a path: name the files after its base name.
		name := strings.TrimSuffix(filepath.Base(strings.Fields(model)[0]), ".gguf")
		p, err := plot.Lines(model+": decode at budget "+fmt.Sprint(rs[0].Budget), "context (k tokens)", "ms per token", dec)
		if err != nil {
			return err
		}
		if err := plot.Save(p, filepath.Join(dir, "decode-"+name)); err != nil {
			return err
		}
		if p, err = plot.Lines(model+": device-resident KV", "context (k tokens)", "MiB", res); err != nil {
			return err
		}
		if err := plot.Save(p, filepath.Join(dir, "resident-"+name)); err != nil {
			return err
		}
	}
	return nil
}
