// Package niah runs needle-in-a-haystack grids (context length x depth)
// under each paging method. Every haystack is ingested once as a document,
// then asked under each method and budget. Two modes:
//
//   - recall: the foundry's recall model and its word vocabulary (needles
//     "K V1 V2 V3", exact-token scoring);
//   - text: any pretrained GGUF, an English haystack, a needle sentence
//     placed at a sentence boundary, string-match scoring.
//
// Each finished cell is one JSON line, so a run that stops can resume.
package niah

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/bench/runinfo"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// Config selects the cases.
type Config struct {
	Model    string    // name recorded in every row
	Methods  []string  // dense, window, quest, retro
	Budgets  []int     // tokens
	Lengths  []int     // context tokens
	Depths   []float64 // in [0, 1]
	Needles  int       // needles per haystack, each asked (default 1)
	Seed     uint64
	Progress func(stage string, done, total int) // ingest progress, if set
	// Extra is passed to every session's runtime.PolicyOptions.Extra
	// (probe's settings under probe.OptionKey).
	Extra map[string]any

	// Recall mode (the default when Recall is set).
	Recall *haystack.Vocab
	// Text mode.
	Haystack  []string // sentences; nil uses GeneratedHaystack
	Needle    TextNeedle
	MaxTokens int // answer tokens in text mode (default 16)

	// Ingests are the prefills each haystack gets, each answered under
	// every method (default: one dense ingest).
	Ingests []Ingest

	// Done holds the keys (Row.Key) of cells already measured: a resumed run
	// skips them.
	Done map[string]bool
}

// Ingest is one way to prefill a haystack: dense (Hyper nil, Streaming
// false), with HyperAttention (runtime.IngestOptions.Hyper), or probe's
// streaming prefill within Budget tokens (IngestOptions.Streaming). Name
// labels its rows.
type Ingest struct {
	Name      string
	Hyper     *runtime.HyperOptions
	Streaming bool
	Budget    int
}

// ingests returns c.Ingests, or the dense ingest alone.
func (c Config) ingests() []Ingest {
	if len(c.Ingests) == 0 {
		return []Ingest{{Name: "dense"}}
	}
	return c.Ingests
}

// Row is one cell: one haystack asked under one method and budget.
type Row struct {
	Model string `json:"model"`
	// Ingest names the haystack's prefill (Config.Ingests); "" is dense.
	Ingest        string  `json:"ingest,omitempty"`
	Method        string  `json:"method"`
	Budget        int     `json:"budget"`
	Length        int     `json:"context_length"`
	Depth         float64 `json:"depth_percent"`
	Needles       int     `json:"needles"`
	Needle        string  `json:"needle"`
	Response      string  `json:"response"`
	Expected      string  `json:"expected"`
	Score         float64 `json:"score"` // percent of needles answered
	Exact         bool    `json:"exact"`
	MsPerToken    float64 `json:"ms_per_token"`
	PrefillSec    float64 `json:"prefill_seconds"`
	IngestSec     float64 `json:"ingest_seconds,omitempty"` // wall time of the whole ingest
	ResidentBytes int64   `json:"resident_kv_bytes"`
	// AttendedBytes is the KV the answer's last decode step attended to
	// (every layer and head group).
	AttendedBytes int64 `json:"attended_kv_bytes"`
	// LayerBudgets are the tokens each layer attended to for the first
	// question, for methods with a per-request cut-off (probe).
	LayerBudgets []int `json:"layer_budgets,omitempty"`
}

// Key identifies a cell for resuming.
func (r Row) Key() string { return key(r.Ingest, r.Method, r.Budget, r.Length, r.Depth) }

func key(ingest, method string, budget, length int, depthPct float64) string {
	k := fmt.Sprintf("%s|%d|%d|%.3f", method, budget, length, depthPct)
	if ingest != "" && ingest != "dense" { // rows of dense ingests keep their old keys
		k = ingest + "|" + k
	}
	return k
}

// Line formats a row for the terminal.
func (r Row) Line() string {
	verdict := "exact"
	if !r.Exact {
		verdict = fmt.Sprintf("%3.0f%%", r.Score)
	}
	ingest := ""
	if r.Ingest != "" && r.Ingest != "dense" {
		ingest = fmt.Sprintf("ingest %s (%.1fs)  ", r.Ingest, r.PrefillSec)
	}
	s := fmt.Sprintf("%slength %6d  depth %5.1f%%  %-6s budget %5d  %-5s  %6.2f ms/token  resident %s  attended %s",
		ingest, r.Length, r.Depth, r.Method, r.Budget, verdict, r.MsPerToken, human(r.ResidentBytes), human(r.AttendedBytes))
	if r.LayerBudgets != nil {
		s += fmt.Sprintf("  layer budgets %v", r.LayerBudgets)
	}
	return s
}

func human(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", b>>10)
}

// probe is one question about a haystack.
type probe struct {
	question []int32
	expect   []int32 // recall mode: the exact answer tokens
	answer   string  // text mode: the string that must appear
}

// cell is one haystack with its questions.
type cell struct {
	tokens []int32
	depth  float64 // as placed
	needle string
	probes []probe
}

// budgetsFor returns the budgets a method runs with (dense has none).
func budgetsFor(method string, budgets []int) []int {
	if method == "dense" {
		return []int{0}
	}
	return budgets
}

// Total is the number of rows a config produces.
func (c Config) Total() int {
	n := 0
	for _, m := range c.Methods {
		n += len(budgetsFor(m, c.Budgets))
	}
	return n * len(c.Lengths) * len(c.Depths) * len(c.ingests())
}

// Run measures every cell not in c.Done, calling emit with each row as soon
// as it is known. A cancelled ctx stops between questions; rows already
// emitted stay valid.
func Run(ctx context.Context, m *runtime.Model, c Config, emit func(Row) error) error {
	if c.Needles <= 0 {
		c.Needles = 1
	}
	if c.MaxTokens <= 0 {
		c.MaxTokens = 16
	}
	if c.Recall == nil && c.Needle.Answer == "" {
		c.Needle = DefaultNeedle
	}
	if c.Recall == nil && c.Haystack == nil {
		c.Haystack = GeneratedHaystack(400, c.Seed)
	}
	for _, length := range c.Lengths {
		for _, depth := range c.Depths {
			var cl *cell
			for _, in := range c.ingests() {
				if err := c.runIngest(ctx, m, in, length, depth, &cl, emit); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// runIngest prefills the haystack of (length, depth) with in (building it
// into *cl on first use) and asks it under every method and budget not
// done yet.
func (c Config) runIngest(ctx context.Context, m *runtime.Model, in Ingest, length int, depth float64, cl **cell, emit func(Row) error) error {
	name := in.Name
	if in.Hyper == nil && name == "dense" {
		name = "" // dense rows look as they did before ingests were a choice
	}
	var todo []Row
	for _, method := range c.Methods {
		for _, b := range budgetsFor(method, c.Budgets) {
			r := Row{Model: c.Model, Ingest: name, Method: method, Budget: b, Length: length, Depth: 100 * depth}
			if !c.Done[r.Key()] {
				todo = append(todo, r)
			}
		}
	}
	if len(todo) == 0 {
		return nil
	}
	if in.Streaming && in.Budget <= 0 {
		return fmt.Errorf("niah: streaming ingest %q needs a positive budget", in.Name)
	}
	if *cl == nil {
		var err error
		if *cl, err = c.build(m, length, depth); err != nil {
			return err
		}
	}
	var prog runtime.Progress
	if c.Progress != nil {
		stage := fmt.Sprintf("ingest %d tokens (%s), depth %.0f%%", length, in.Name, 100*depth)
		prog = func(done, total int) { c.Progress(stage, done, total) }
	}
	t0 := time.Now()
	id := fmt.Sprintf("niah-%d-%05.1f-%d-%d", length, 100*depth, c.Needles, c.Seed)
	if name != "" {
		id += "-" + strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
				return r
			}
			return '_'
		}, name)
	}
	opts := runtime.IngestOptions{Hyper: in.Hyper}
	if in.Streaming {
		opts.Streaming, opts.Budget = true, in.Budget
	}
	doc, err := m.IngestTokensWith(ctx, id, (*cl).tokens, opts, prog)
	if err != nil {
		return fmt.Errorf("ingest %s at %d tokens: %w", in.Name, length, err)
	}
	// The ingest's wall time includes page upkeep, saving and, for a
	// streaming ingest, the probe representatives it stores (a dense
	// document computes them at its first probe question).
	ingest := time.Since(t0).Seconds()
	prefill := doc.PrefillSeconds
	if prefill == 0 {
		prefill = ingest
	}
	for _, r := range todo {
		if err := ask(ctx, m, doc, *cl, &r, c.MaxTokens, c.Extra); err != nil {
			return fmt.Errorf("%s at %d tokens, depth %.0f%%: %w", r.Method, length, 100*depth, err)
		}
		r.PrefillSec, r.IngestSec, r.Needle = prefill, ingest, (*cl).needle
		if err := emit(r); err != nil {
			return err
		}
	}
	// The ingested pages are not needed again; keep disk use bounded.
	m.DeleteDocument(id)
	return nil
}

// build makes the haystack of one cell.
func (c Config) build(m *runtime.Model, length int, depth float64) (*cell, error) {
	tok := m.Tokenizer()
	if c.Recall != nil {
		v := c.Recall
		depths := []float64{depth}
		if c.Needles > 1 {
			depths = haystack.Cluster(depth, c.Needles, 1.0/32)
		}
		cs, err := v.NewCase(length, depths, c.Seed+uint64(length)*1000+uint64(depth*1000))
		if err != nil {
			return nil, err
		}
		cl := &cell{tokens: cs.Tokens, depth: depth}
		for i, n := range cs.Needles {
			cl.probes = append(cl.probes, probe{question: v.Question(n), expect: n.Values})
			if i == 0 {
				cl.needle = words(tok, append([]int32{n.Key}, n.Values...))
			}
		}
		return cl, nil
	}
	count := func(s string) int {
		ids, err := tok.Encode(s, false)
		if err != nil {
			return len(s)
		}
		return len(ids)
	}
	q, err := tok.Encode("\n\nQuestion: "+c.Needle.Question+"\nAnswer:", false)
	if err != nil {
		return nil, err
	}
	text, placed, err := Place(c.Haystack, c.Needle.Needle, length-len(q)-c.MaxTokens-2, depth, count)
	if err != nil {
		return nil, err
	}
	ids, err := tok.Encode(text, true)
	if err != nil {
		return nil, err
	}
	return &cell{tokens: ids, depth: placed, needle: c.Needle.Needle, probes: []probe{{question: q, answer: c.Needle.Answer}}}, nil
}

func words(tok *runtime.Tokenizer, ids []int32) string {
	s, _ := tok.Decode(ids)
	return strings.TrimPrefix(s, " ")
}

func ask(ctx context.Context, m *runtime.Model, doc *runtime.Document, cl *cell, row *Row, maxTokens int, cfgExtra map[string]any) error {
	row.Needles = len(cl.probes)
	var dec time.Duration
	var gen int
	var total float64
	for i, p := range cl.probes {
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: row.Method, Budget: row.Budget, Extra: cfgExtra})
		if err != nil {
			return err
		}
		n := maxTokens
		if p.expect != nil {
			n = len(p.expect)
		}
		res, err := s.Generate(ctx, p.question, runtime.GenerateOptions{MaxTokens: n})
		if pc, ok := s.Cache().(*kvcache.Paged); ok {
			st := pc.Stats()
			row.ResidentBytes = max(row.ResidentBytes, st.ResidentBytes)
			row.AttendedBytes = max(row.AttendedBytes, st.AttendedBytes)
		}
		s.Close()
		if err != nil {
			return err
		}
		score := 0.0
		if p.expect != nil {
			if slices.Equal(res.Tokens, p.expect) {
				score = 100
			}
		} else {
			score = StringMatch(res.Text, p.answer)
		}
		total += score
		dec += res.DecodeDuration
		gen += res.GeneratedTokens
		if i == 0 {
			row.LayerBudgets = res.LayerBudgets
			row.Response = strings.TrimSpace(res.Text)
			if p.expect != nil {
				row.Expected = words(m.Tokenizer(), p.expect)
			} else {
				row.Expected = p.answer
			}
		}
	}
	row.Score = total / float64(len(cl.probes))
	row.Exact = row.Score == 100
	if gen > 0 {
		row.MsPerToken = float64(dec.Microseconds()) / 1000 / float64(gen)
	}
	return nil
}

// Summary is the closing line.
func Summary(rows []Row) string {
	exact := 0
	for _, r := range rows {
		if r.Exact {
			exact++
		}
	}
	return fmt.Sprintf("exact %d of %d", exact, len(rows))
}

// Resume reads path (if it exists) and returns the rows and the keys done.
func Resume(path string) ([]Row, map[string]bool, error) {
	rows, err := runinfo.ReadLines[Row](path)
	done := map[string]bool{}
	for _, r := range rows {
		done[r.Key()] = true
	}
	return rows, done, err
}
