package ruler

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

// RULER's metrics (RULER/scripts/eval/synthetic/constants.py).
func TestMetrics(t *testing.T) {
	cases := []struct {
		pred      string
		refs      []string
		all, part float64
	}{
		{"The numbers are 123 and 456.", []string{"123", "456"}, 100, 100},
		{"only 123 here", []string{"123", "456"}, 50, 100},
		{"nothing", []string{"123", "456"}, 0, 0},
		{"UPPER CASE Word", []string{"upper case word"}, 100, 100},
		{"1234", []string{"123"}, 100, 100}, // substring match, as RULER
		{"anything", nil, 0, 0},
		{"a b c d", []string{"a", "b", "c", "x"}, 75, 100},
	}
	for _, c := range cases {
		require.Equal(t, c.all, StringMatchAll(c.pred, c.refs), "all: %q %v", c.pred, c.refs)
		require.Equal(t, c.part, StringMatchPart(c.pred, c.refs), "part: %q %v", c.pred, c.refs)
		require.Equal(t, c.all, MatchAll.Score(c.pred, c.refs))
		require.Equal(t, c.part, MatchPart.Score(c.pred, c.refs))
	}
}

// Text tasks: lengths within bounds, every reference present in the context
// where it must be, templates as RULER's.
func TestTextSamples(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.StoriesV3(t), runtime.Options{Threads: 1, ContextLength: 4096, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	enc := func(s string, bos bool) ([]int32, error) { return m.Tokenizer().Encode(s, bos) }
	for _, task := range Tasks {
		t.Run(task, func(t *testing.T) {
			s, err := TextSample(task, 2048, 1, enc)
			require.NoError(t, err)
			total := len(s.Context) + len(s.Questions[0]) + s.MaxTokens
			require.LessOrEqual(t, total, 2048)
			require.Greater(t, total, 1800, "the context fills the length")
			ctx, _ := m.Tokenizer().Decode(s.Context)
			require.NotEmpty(t, s.Refs)
			for _, ref := range s.Refs {
				require.Contains(t, ctx, ref)
			}
			q, _ := m.Tokenizer().Decode(s.Questions[0])
			switch task {
			case "niah_single", "niah_multikey":
				require.Len(t, s.Refs, 1)
				require.Contains(t, q, "What is the special magic number")
			case "niah_multivalue", "niah_multiquery":
				require.Len(t, s.Refs, 4)
			case "vt":
				require.Len(t, s.Refs, 5)
				require.Contains(t, ctx, "VAR "+s.Refs[1]+" = VAR "+s.Refs[0])
			case "cwe":
				require.Len(t, s.Refs, 10)
				for _, ref := range s.Refs { // common words are frequent
					require.GreaterOrEqual(t, strings.Count(ctx, " "+ref+" "), 2, ref)
				}
			case "fwe":
				require.Len(t, s.Refs, 3)
			}
		})
	}
	_, err = TextSample("qa_1", 2048, 1, enc)
	require.ErrorContains(t, err, "unknown RULER task")
}

// On the recall model: the needle tasks it can do score 100 under dense
// attention; summaries average per task and length.
func TestRunRecall(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 2200, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	cfg := Config{Model: "recall", Tasks: []string{"niah_single", "niah_multikey", "niah_multiquery", "cwe"}, Lengths: []int{1024, 2048},
		Samples: 2, Methods: []string{"dense", "retro", "probe"}, Budgets: []int{1024}, Recall: voc}
	var rows []Row
	require.NoError(t, Run(context.Background(), m, cfg, func(r Row) error { rows = append(rows, r); return nil }))
	require.Len(t, rows, cfg.Total())
	for _, r := range rows {
		if strings.HasPrefix(r.Task, "niah") && r.Method != "probe" {
			require.Equal(t, 100.0, r.Score, "%+v", r)
		}
		// probe reports its per-layer cut-off; fixed-budget methods do not.
		if r.Method == "probe" {
			require.Len(t, r.LayerBudgets, 2, "%+v", r)
		} else {
			require.Nil(t, r.LayerBudgets, "%+v", r)
		}
	}
	require.Contains(t, LayerBudgets(rows), "| probe | 1024 | 1024 | 8 | ")
	sums := Summarize(rows)
	require.Len(t, sums, 3*4*2)
	csv := CSV(sums)
	require.True(t, strings.HasPrefix(csv, "method,budget,task,1024,2048,average\n"))
	require.Contains(t, csv, "dense,0,niah_single,100.0,100.0,100.0")
	md := Markdown(sums)
	require.Contains(t, md, "| retro | 1024 | niah_multiquery | 100.0 | 100.0 | 100.0 |")
}

// LayerBudgets averages each layer over the samples of a method, budget and
// length, shows the range where they differ, and is empty without probe.
func TestLayerBudgetsTable(t *testing.T) {
	cases := []struct {
		name string
		rows []Row
		want []string
	}{
		{"none", []Row{{Method: "retro", Budget: 2048, Length: 4096}}, nil},
		{"equal", []Row{
			{Method: "probe", Budget: 2048, Length: 4096, LayerBudgets: []int{2048, 2048}},
			{Method: "probe", Budget: 2048, Length: 4096, LayerBudgets: []int{2048, 2048}},
		}, []string{"| probe | 2048 | 4096 | 2 | 2048, 2048 |"}},
		{"ranges, sorted by budget", []Row{
			{Method: "probe", Budget: 2048, Length: 4096, LayerBudgets: []int{1792, 2304}},
			{Method: "probe", Budget: 2048, Length: 4096, LayerBudgets: []int{2048, 2048}},
			{Method: "probe", Budget: 1024, Length: 4096, LayerBudgets: []int{1024, 1024}},
			{Method: "retro", Budget: 1024, Length: 4096},
		}, []string{"| probe | 1024 | 4096 | 1 | 1024, 1024 |\n| probe | 2048 | 4096 | 2 | 1920 (1792–2048), 2176 (2048–2304) |"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := LayerBudgets(c.rows)
			if c.want == nil {
				require.Empty(t, got)
				return
			}
			for _, w := range c.want {
				require.Contains(t, got, w)
			}
		})
	}
}
