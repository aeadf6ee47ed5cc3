package ruler

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/runtime"
)

// Config selects a run.
type Config struct {
	Model   string
	Tasks   []string
	Lengths []int
	Samples int // per task and length (RULER uses 500; default 3)
	Methods []string
	Budgets []int
	Seed    uint64
	Recall  *haystack.Vocab // recall mode when set, else English text mode
	Done    map[string]bool // resumed rows (Row.Key)
	// Extra is passed to every session's runtime.PolicyOptions.Extra
	// (probe's settings under probe.OptionKey).
	Extra map[string]any
}

// Row is one sample asked under one method and budget.
type Row struct {
	Model      string   `json:"model"`
	Task       string   `json:"task"`
	Length     int      `json:"context_length"`
	Sample     int      `json:"sample"`
	Method     string   `json:"method"`
	Budget     int      `json:"budget"`
	Metric     Metric   `json:"metric"`
	Score      float64  `json:"score"`
	Prediction string   `json:"prediction"`
	Refs       []string `json:"references"`
	MsPerToken float64  `json:"ms_per_token"`
	Tokens     int      `json:"context_tokens"`
	// LayerBudgets are the tokens each layer attended to for the sample's
	// first question, for methods with a per-request cut-off (probe).
	LayerBudgets []int `json:"layer_budgets,omitempty"`
}

// Key identifies a row for resuming.
func (r Row) Key() string {
	return fmt.Sprintf("%s|%d|%d|%s|%d", r.Task, r.Length, r.Sample, r.Method, r.Budget)
}

// Total is the number of rows the config produces.
func (c Config) Total() int {
	n := 0
	for _, m := range c.Methods {
		if m == "dense" {
			n++
		} else {
			n += len(c.Budgets)
		}
	}
	return n * len(c.Tasks) * len(c.Lengths) * max(1, c.Samples)
}

// Run generates every sample once, ingests its context as a document and
// asks it under every method and budget.
func Run(ctx context.Context, m *runtime.Model, c Config, emit func(Row) error) error {
	if c.Samples <= 0 {
		c.Samples = 3
	}
	tok := m.Tokenizer()
	words := func(ids []int32) string {
		s, _ := tok.Decode(ids)
		return strings.TrimSpace(s)
	}
	enc := func(text string, bos bool) ([]int32, error) { return tok.Encode(text, bos) }
	for _, task := range c.Tasks {
		for _, length := range c.Lengths {
			for i := 0; i < c.Samples; i++ {
				var todo []Row
				for _, meth := range c.Methods {
					budgets := c.Budgets
					if meth == "dense" {
						budgets = []int{0}
					}
					for _, b := range budgets {
						r := Row{Model: c.Model, Task: task, Length: length, Sample: i, Method: meth, Budget: b}
						if !c.Done[r.Key()] {
							todo = append(todo, r)
						}
					}
				}
				if len(todo) == 0 {
					continue
				}
				seed := c.Seed*1_000_003 + uint64(i)*7919 + uint64(slices.Index(Tasks, task))
				var s *Sample
				var err error
				if c.Recall != nil {
					s, err = RecallSample(task, length, seed, c.Recall, words)
				} else {
					s, err = TextSample(task, length, seed, enc)
				}
				if err != nil {
					return err
				}
				id := fmt.Sprintf("ruler-%s-%d-%d", task, length, i)
				doc, err := m.IngestTokens(ctx, id, s.Context, nil)
				if err != nil {
					return err
				}
				for _, r := range todo {
					if err := askSample(ctx, m, doc, s, &r, c.Extra); err != nil {
						m.DeleteDocument(id)
						return err
					}
					if err := emit(r); err != nil {
						return err
					}
				}
				m.DeleteDocument(id)
			}
		}
	}
	return nil
}

func askSample(ctx context.Context, m *runtime.Model, doc *runtime.Document, s *Sample, r *Row, extra map[string]any) error {
	var pred []string
	var dec time.Duration
	gen := 0
	for _, q := range s.Questions {
		sess, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: r.Method, Budget: r.Budget, Extra: extra})
		if err != nil {
			return err
		}
		res, err := sess.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: s.MaxTokens})
		sess.Close()
		if err != nil {
			return err
		}
		if r.LayerBudgets == nil {
			r.LayerBudgets = res.LayerBudgets
		}
		pred = append(pred, strings.TrimSpace(res.Text))
		dec += res.DecodeDuration
		gen += res.GeneratedTokens
	}
	r.Prediction = strings.Join(pred, " | ")
	r.Refs, r.Metric, r.Tokens = s.Refs, s.Metric, len(s.Context)
	r.Score = s.Metric.Score(r.Prediction, s.Refs)
	if gen > 0 {
		r.MsPerToken = float64(dec.Microseconds()) / 1000 / float64(gen)
	}
	return nil
}

// Summary averages scores per method, budget, task and length.
type Summary struct {
	Method  string
	Budget  int
	Task    string
	Length  int
	Score   float64
	Samples int
}

// Summarize groups rows; the result is sorted by method, budget, task, length.
func Summarize(rows []Row) []Summary {
	type k struct {
		m      string
		b      int
		t      string
		length int
	}
	sum := map[k]*Summary{}
	for _, r := range rows {
		key := k{r.Method, r.Budget, r.Task, r.Length}
		s := sum[key]
		if s == nil {
			s = &Summary{Method: r.Method, Budget: r.Budget, Task: r.Task, Length: r.Length}
			sum[key] = s
		}
		s.Score += r.Score
		s.Samples++
	}
	out := make([]Summary, 0, len(sum))
	for _, s := range sum {
		s.Score /= float64(s.Samples)
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Method != b.Method {
			return a.Method < b.Method
		}
		if a.Budget != b.Budget {
			return a.Budget < b.Budget
		}
		if ai, bi := slices.Index(Tasks, a.Task), slices.Index(Tasks, b.Task); ai != bi {
			return ai < bi
		}
		return a.Length < b.Length
	})
	return out
}

// CSV formats the summary like RULER's summary.csv: one row per method,
// budget and task, one column per length, and an average.
func CSV(sums []Summary) string {
	lengths := lengthsOf(sums)
	var b strings.Builder
	b.WriteString("method,budget,task")
	for _, l := range lengths {
		fmt.Fprintf(&b, ",%d", l)
	}
	b.WriteString(",average\n")
	for _, g := range groups(sums) {
		fmt.Fprintf(&b, "%s,%d,%s", g[0].Method, g[0].Budget, g[0].Task)
		for _, l := range lengths {
			b.WriteString("," + cell(g, l, "%.1f"))
		}
		fmt.Fprintf(&b, ",%.1f\n", mean(g))
	}
	return b.String()
}

// Markdown formats the same table for docs.
func Markdown(sums []Summary) string {
	lengths := lengthsOf(sums)
	var b strings.Builder
	b.WriteString("| method | budget | task |")
	for _, l := range lengths {
		fmt.Fprintf(&b, " %d |", l)
	}
	b.WriteString(" average |\n|---|---|---|")
	for range lengths {
		b.WriteString("---|")
	}
	b.WriteString("---|\n")
	for _, g := range groups(sums) {
		budget := fmt.Sprint(g[0].Budget)
		if g[0].Method == "dense" {
			budget = "—"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |", g[0].Method, budget, g[0].Task)
		for _, l := range lengths {
			b.WriteString(" " + cell(g, l, "%.1f") + " |")
		}
		fmt.Fprintf(&b, " %.1f |\n", mean(g))
	}
	return b.String()
}

// LayerBudgets formats, for methods with a per-request cut-off (probe),
// each layer's budget (tokens attended for a sample's first question)
// averaged over the samples, with its range, per method, budget and
// length; "" when no row has any.
func LayerBudgets(rows []Row) string {
	type k struct {
		m         string
		b, length int
	}
	var keys []k
	per := map[k][][]int{}
	for _, r := range rows {
		if r.LayerBudgets == nil {
			continue
		}
		key := k{r.Method, r.Budget, r.Length}
		if _, ok := per[key]; !ok {
			keys = append(keys, key)
		}
		per[key] = append(per[key], r.LayerBudgets)
	}
	if len(keys) == 0 {
		return ""
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := keys[i], keys[j]
		if a.m != b.m {
			return a.m < b.m
		}
		if a.b != b.b {
			return a.b < b.b
		}
		return a.length < b.length
	})
	var b strings.Builder
	b.WriteString("| method | budget | length | samples | per-layer budget: mean (min–max) |\n|---|---|---|---|---|\n")
	for _, key := range keys {
		lbs := per[key]
		var cells []string
		for l := range lbs[0] {
			lo, hi, sum := lbs[0][l], lbs[0][l], 0
			for _, lb := range lbs {
				if l >= len(lb) {
					continue
				}
				lo, hi, sum = min(lo, lb[l]), max(hi, lb[l]), sum+lb[l]
			}
			c := fmt.Sprintf("%.0f", float64(sum)/float64(len(lbs)))
			if lo != hi {
				c += fmt.Sprintf(" (%d–%d)", lo, hi)
			}
			cells = append(cells, c)
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %s |\n", key.m, key.b, key.length, len(lbs), strings.Join(cells, ", "))
	}
	return b.String()
}

func lengthsOf(sums []Summary) []int {
	var ls []int
	for _, s := range sums {
		if !slices.Contains(ls, s.Length) {
			ls = append(ls, s.Length)
		}
	}
	slices.Sort(ls)
	return ls
}

func groups(sums []Summary) [][]Summary {
	var out [][]Summary
	for _, s := range sums {
		n := len(out)
		if n > 0 && out[n-1][0].Method == s.Method && out[n-1][0].Budget == s.Budget && out[n-1][0].Task == s.Task {
			out[n-1] = append(out[n-1], s)
			continue
		}
		out = append(out, []Summary{s})
	}
	return out
}

func cell(g []Summary, l int, format string) string {
	for _, s := range g {
		if s.Length == l {
			return fmt.Sprintf(format, s.Score)
		}
	}
	return ""
}

func mean(g []Summary) float64 {
	t := 0.0
	for _, s := range g {
		t += s.Score
	}
	return t / float64(len(g))
}
