package speed

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/bench/plot"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/llamaref"
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
	// Hyper, if set, ingests with HyperAttention (runtime.IngestOptions).
	Hyper *runtime.HyperOptions
	// Streaming also ingests each document with probe's streaming prefill
	// (runtime.IngestOptions.Streaming, within Budget), timed beside the
	// dense ingest and llama.cpp's prefill of the same tokens. Decode
	// still runs on the densely ingested document.
	Streaming bool
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
	// IngestSec is the dense ingest's wall time (prefill, page upkeep and
	// saving), StreamingIngestSec the streaming prefill's (with its probe
	// representatives, which a dense document computes at its first probe
	// question), when PagedConfig.Streaming.
	IngestSec          float64 `json:"ingest_seconds,omitempty"`
	StreamingIngestSec float64 `json:"streaming_ingest_seconds,omitempty"`
	// LayerBudgets are the tokens each layer attended to for the question,
	// for methods with a per-request cut-off (probe).
	LayerBudgets map[string][]int `json:"layer_budgets,omitempty"`
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
		DecodeMs: map[string]float64{}, Resident: map[string]int64{}, ResidentByClass: map[string]map[string]int64{}}
	capacity := n + 64 + c.DecodeTokens
	dir, err := os.MkdirTemp("", "kvrecall-speed-")
	if err != nil {
		return row, err
	}
	defer os.RemoveAll(dir)
	// A squeezed method needs the document's clusters, made at ingest.
	var sq *squeezed.Options
	for _, meth := range c.Methods {
		if strings.HasPrefix(meth, "squeezed") {
			sq = &squeezed.Options{}
		}
	}
	ingester, err := runtime.Open(ctx, c.Model, runtime.Options{Threads: c.Threads, ContextLength: capacity, DataDir: dir, Squeezed: sq})
	if err != nil {
		return row, err
	}
	toks := prompt(n, ingester.Config().Vocab)
	question := prompt(n+8, ingester.Config().Vocab)[n:]
	how := "dense prefill through the paged cache"
	if c.Hyper != nil {
		how = fmt.Sprintf("HyperAttention prefill, layers %v (all if empty)", c.Hyper.Layers)
	}
	logf("%s %d: ingest (%s)", c.Label, n, how)
	t0 := time.Now()
	doc, err := ingester.IngestTokensWith(ctx, "speed", toks, runtime.IngestOptions{Hyper: c.Hyper}, nil)
	if err != nil {
		ingester.Close()
		return row, err
	}
	row.IngestSec = time.Since(t0).Seconds()
	if c.Streaming {
		logf("%s %d: ingest (streaming prefill under probe, budget %d)", c.Label, n, c.Budget)
		t0 := time.Now()
		if _, err := ingester.IngestTokensWith(ctx, "speed-streaming", toks, runtime.IngestOptions{Streaming: true, Budget: c.Budget}, nil); err != nil {
			ingester.Close()
			return row, fmt.Errorf("streaming ingest: %w", err)
		}
		row.StreamingIngestSec = time.Since(t0).Seconds()
		if err := ingester.DeleteDocument("speed-streaming"); err != nil {
			ingester.Close()
			return row, err
		}
	}
	ingester.Close()
	row.PrefillSec, row.UpkeepSec, row.ClusterSec = doc.PrefillSeconds, doc.UpkeepSeconds, doc.ClusterSeconds

	// Decode with its own thread count: the document comes back from disk.
	m, err := runtime.Open(ctx, c.Model, runtime.Options{Threads: c.DecodeThreads, ContextLength: capacity, DataDir: dir})
	if err != nil {
		return row, err
	}
	defer m.Close()
	if err := runtime.ApplyHeadProfile(m, c.HeadProfile); err != nil {
		return row, err
	}
	if doc, err = m.OpenDocument("speed"); err != nil {
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

	logf("%s %d: llama.cpp prefill", c.Label, n)
	ref, err := llamaref.Load(c.Model, llamaref.Options{Threads: c.DecodeThreads, BatchThreads: c.Threads, Context: capacity})
	if err != nil {
		return row, err
	}
	defer ref.Close()
	t0 = time.Now()
	if _, err := ref.Append(toks, false, nil); err != nil {
		return row, err
	}
	row.LlamaPrefillS = time.Since(t0).Seconds()
	if _, err := ref.Append(question, false, nil); err != nil {
		return row, err
	}

	methods := append([]string{"dense"}, c.Methods...)
	sessions := make([]*runtime.Session, len(methods))
	for i, meth := range methods {
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: meth, Budget: c.Budget})
		if err != nil {
			return row, err
		}
		defer s.Close()
		if _, err := s.Eval(ctx, question, false, nil); err != nil {
			return row, fmt.Errorf("%s: %w", meth, err)
		}
		if lb := s.LayerBudgets(); lb != nil {
			if row.LayerBudgets == nil {
				row.LayerBudgets = map[string][]int{}
			}
			row.LayerBudgets[meth] = lb
		}
		sessions[i] = s
	}
	steps := make([][]time.Duration, len(methods)+1)
	for i := 0; i < c.DecodeTokens; i++ {
		tok := toks[i : i+1]
		for j, s := range sessions {
			t0 := time.Now()
			if _, err := s.Eval(ctx, tok, false, nil); err != nil {
				return row, fmt.Errorf("%s: %w", methods[j], err)
			}
			steps[j] = append(steps[j], time.Since(t0))
		}
		t0 := time.Now()
		if _, err := ref.Append(tok, false, nil); err != nil {
			return row, err
		}
		steps[len(methods)] = append(steps[len(methods)], time.Since(t0))
	}
	for j, meth := range methods {
		row.DecodeMs[meth] = median(steps[j])
		st := sessions[j].Cache().(*kvcache.Paged).Stats()
		row.Resident[meth], row.ResidentByClass[meth] = st.ResidentBytes, st.ResidentByClass
	}
	row.DecodeMs["llama.cpp"] = median(steps[len(methods)])
	row.Resident["llama.cpp"] = int64(capacity) * int64(m.Config().KVBytesPerToken(2))
	logf("%s %d: decode ms/token %v (base %.2f), prefill %.1fs (upkeep %.1f%%), llama.cpp prefill %.1fs",
		c.Label, n, row.DecodeMs, row.BaseMs, row.PrefillSec, 100*row.UpkeepShare(), row.LlamaPrefillS)
	if row.StreamingIngestSec > 0 {
		logf("%s %d: ingest %.1fs dense, %.1fs streaming", c.Label, n, row.IngestSec, row.StreamingIngestSec)
	}
	for meth, lb := range row.LayerBudgets {
		logf("%s %d: %s per-layer budgets %v", c.Label, n, meth, lb)
	}
	return row, nil
}

// PagedTable formats rows as Markdown: decode time per method with ratios
// against our dense attention and llama.cpp, attention time, resident KV and
// upkeep share.
func PagedTable(rows []PagedRow, methods []string) string {
	s := "| model | context | budget | method | decode ms/token | speedup vs dense (ours) | speedup vs llama.cpp | attention ms/token | attention reduction vs dense | resident KV |\n"
	s += "|---|---|---|---|---|---|---|---|---|---|\n"
	for _, r := range rows {
		for _, m := range append([]string{"llama.cpp", "dense"}, methods...) {
			ms := r.DecodeMs[m]
			att := "—"
			attRatio := "—"
			if m != "llama.cpp" {
				att = fmt.Sprintf("%.2f", r.AttentionMs(m))
				if a := r.AttentionMs(m); a > 0 {
					attRatio = fmt.Sprintf("%.1fx", r.AttentionMs("dense")/a)
				}
			}
			s += fmt.Sprintf("| %s | %d | %d | %s | %.2f | %.2f | %.2f | %s | %s | %s |\n",
				r.Model, r.Context, r.Budget, m, ms, r.DecodeMs["dense"]/ms, r.DecodeMs["llama.cpp"]/ms, att, attRatio, mib(r.Resident[m]))
		}
	}
	s += "\n| model | context | prefill s (kvrecall, paged ingest) | prefill s (llama.cpp) | summary upkeep share |\n|---|---|---|---|---|\n"
	for _, r := range rows {
		s += fmt.Sprintf("| %s | %d | %.1f | %.1f | %.2f%% |\n", r.Model, r.Context, r.PrefillSec, r.LlamaPrefillS, 100*r.UpkeepShare())
	}
	if slices.ContainsFunc(rows, func(r PagedRow) bool { return r.StreamingIngestSec > 0 }) {
		s += "\n| model | context | budget | dense ingest s | streaming ingest s | llama.cpp prefill s | streaming vs dense | streaming vs llama.cpp |\n|---|---|---|---|---|---|---|---|\n"
		for _, r := range rows {
			if r.StreamingIngestSec > 0 {
				s += fmt.Sprintf("| %s | %d | %d | %.1f | %.1f | %.1f | %.2fx | %.2fx |\n", r.Model, r.Context, r.Budget, r.IngestSec, r.StreamingIngestSec, r.LlamaPrefillS,
					r.IngestSec/r.StreamingIngestSec, r.LlamaPrefillS/r.StreamingIngestSec)
			}
		}
	}
	s += LayerBudgetTable(rows, methods)
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
				x := float64(r.Context) / 1024
				d.X, d.Y = append(d.X, x), append(d.Y, r.DecodeMs[m])
				k.X, k.Y = append(k.X, x), append(k.Y, float64(r.Resident[m])/(1<<20))
			}
			dec, res = append(dec, d), append(res, k)
		}
		// A --model label is a path: name the files after its base.
		name := filepath.Base(strings.Fields(model)[0])
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
