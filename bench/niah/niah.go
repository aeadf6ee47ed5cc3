// Package niah runs needle-in-a-haystack cases on the foundry's recall model
// under each paging method: every (length, depth) haystack is ingested once
// as a document, then asked under each method and budget.
package niah

import (
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// Config selects the cases.
type Config struct {
	Methods  []string  // dense, window, quest, retro
	Budgets  []int     // tokens
	Lengths  []int     // haystack tokens
	Depths   []float64 // in [0, 1]
	Needles  int       // needles per haystack, asked in turn (default 1)
	Seed     uint64
	Progress func(stage string, done, total int) // ingest progress, if set
}

// Row is one case.
type Row struct {
	Length        int     `json:"context_length"`
	Depth         float64 `json:"depth_percent"`
	Method        string  `json:"method"`
	Budget        int     `json:"budget"`
	Exact         bool    `json:"exact"`
	Needles       int     `json:"needles"`
	Found         int     `json:"found"`
	MsPerToken    float64 `json:"ms_per_token"`
	PrefillSec    float64 `json:"prefill_seconds"`
	ResidentBytes int64   `json:"resident_kv_bytes"`
	Response      string  `json:"response"`
	Expected      string  `json:"expected"`
}

// Line formats a row for the terminal.
func (r Row) Line() string {
	verdict := "exact"
	if !r.Exact {
		verdict = "WRONG"
	}
	return fmt.Sprintf("length %6d  depth %5.1f%%  %-6s budget %5d  %-5s  %6.2f ms/token  resident %s",
		r.Length, 100*r.Depth, r.Method, r.Budget, verdict, r.MsPerToken, human(r.ResidentBytes))
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

// Run ingests every haystack once and asks under every method and budget,
// calling emit for each row as soon as it is known.
func Run(ctx context.Context, m *runtime.Model, voc *haystack.Vocab, c Config, emit func(Row) error) error {
	if c.Needles <= 0 {
		c.Needles = 1
	}
	tok := m.Tokenizer()
	words := func(ids []int32) string {
		s, _ := tok.Decode(ids)
		if len(s) > 0 && s[0] == ' ' {
			s = s[1:]
		}
		return s
	}
	for _, length := range c.Lengths {
		for _, depth := range c.Depths {
			depths := []float64{depth}
			if c.Needles > 1 {
				depths = haystack.Cluster(depth, c.Needles, 1.0/32)
			}
			cs, err := voc.NewCase(length, depths, c.Seed+uint64(length)*1000+uint64(depth*100))
			if err != nil {
				return err
			}
			t0 := time.Now()
			var prog runtime.Progress
			if c.Progress != nil {
				stage := fmt.Sprintf("ingest %d tokens, depth %.0f%%", length, 100*depth)
				prog = func(done, total int) { c.Progress(stage, done, total) }
			}
			id := fmt.Sprintf("niah-%d-%03.0f-%d-%d", length, 100*depth, c.Needles, c.Seed)
			doc, err := m.IngestTokens(ctx, id, cs.Tokens, prog)
			if err != nil {
				return err
			}
			prefill := time.Since(t0).Seconds()
			for _, method := range c.Methods {
				budgets := c.Budgets
				if method == "dense" {
					budgets = []int{0}
				}
				for _, budget := range budgets {
					row, err := ask(ctx, m, voc, doc, cs, method, budget, words)
					if err != nil {
						return fmt.Errorf("%s at %d tokens, depth %.0f%%: %w", method, length, 100*depth, err)
					}
					row.Length, row.Depth, row.PrefillSec = length, depth, prefill
					if err := emit(row); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

func ask(ctx context.Context, m *runtime.Model, voc *haystack.Vocab, doc *runtime.Document, cs *haystack.Case,
	method string, budget int, words func([]int32) string) (Row, error) {
	row := Row{Method: method, Budget: budget, Needles: len(cs.Needles)}
	var dec time.Duration
	var gen int
	for i, n := range cs.Needles {
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: method, Budget: budget})
		if err != nil {
			return row, err
		}
		res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
		if pc, ok := s.Cache().(*kvcache.Paged); ok {
			row.ResidentBytes = max(row.ResidentBytes, pc.Stats().ResidentBytes)
		}
		s.Close()
		if err != nil {
			return row, err
		}
		if slices.Equal(res.Tokens, n.Values) {
			row.Found++
		}
		dec += res.DecodeDuration
		gen += res.GeneratedTokens
		if i == 0 {
			row.Response, row.Expected = words(res.Tokens), words(n.Values)
		}
	}
	row.Exact = row.Found == len(cs.Needles)
	if gen > 0 {
		row.MsPerToken = float64(dec.Microseconds()) / 1000 / float64(gen)
	}
	return row, nil
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

// Print writes a row line.
func Print(w io.Writer, r Row) { fmt.Fprintln(w, r.Line()) }
