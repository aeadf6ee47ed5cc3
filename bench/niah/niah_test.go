package niah

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/bench/runinfo"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

func TestDepths(t *testing.T) {
	cases := []struct {
		n       int
		spacing string
		want    []float64
	}{
		{5, "linear", []float64{0, 0.25, 0.5, 0.75, 1}},
		{1, "linear", []float64{0.5}},
		{3, "sigmoid", []float64{0, 0.5, 1}},
	}
	for _, c := range cases {
		got, err := Depths(c.n, c.spacing)
		require.NoError(t, err)
		require.Equal(t, c.want, got)
	}
	sig, err := Depths(7, "sigmoid")
	require.NoError(t, err)
	lin, _ := Depths(7, "linear")
	require.Less(t, sig[1], lin[1], "sigmoid spacing crowds depths near the start")
	require.Greater(t, sig[5], lin[5], "and near the end")
	_, err = Depths(5, "cubic")
	require.ErrorContains(t, err, "spacing")
}

func TestSentences(t *testing.T) {
	cases := []struct {
		in   string
		want []string
	}{
		{"One. Two! Three?", []string{"One. ", "Two! ", "Three?"}},
		{"Pi is 3.14 today. Next.", []string{"Pi is 3.14 today. ", "Next."}},
		{"He said \"stop.\" Then left.", []string{"He said \"stop.\" ", "Then left."}},
		{"no terminator", []string{"no terminator"}},
		{"Line one\nLine two", []string{"Line one\n", "Line two"}},
	}
	for _, c := range cases {
		got := Sentences(c.in)
		require.Equal(t, c.want, got, c.in)
		require.Equal(t, c.in, strings.Join(got, ""))
	}
}

// The needle goes in front of a whole sentence, never inside one, at the
// sentence boundary at or before the requested depth.
func TestPlaceAtSentenceBoundary(t *testing.T) {
	sentences := []string{"Alpha beta gamma. ", "Delta epsilon. ", "Zeta eta theta iota. ", "Kappa lambda. "}
	words := func(s string) int { return len(strings.Fields(s)) }
	needle := "The code is 42."
	for _, c := range []struct {
		depth  float64
		before string // text right before the needle
	}{
		{0, ""},
		{0.3, "Alpha beta gamma. "},
		{0.5, "Alpha beta gamma. Delta epsilon. "},
		{1, "Kappa lambda. "},
	} {
		text, placed, err := Place(sentences, needle, 15, c.depth, words) // the four sentences once
		require.NoError(t, err)
		i := strings.Index(text, needle)
		require.GreaterOrEqual(t, i, 0)
		require.True(t, strings.HasSuffix(text[:i], c.before), "depth %v: %q", c.depth, text[:i])
		require.LessOrEqual(t, placed, c.depth+1e-9, "moved back, never forward")
		for _, s := range Sentences(strings.Replace(text, needle, "", 1)) {
			if strings.TrimSpace(s) != "" {
				require.Contains(t, strings.Join(sentences, ""), strings.TrimSpace(s), "no sentence was cut")
			}
		}
		require.LessOrEqual(t, words(text), 15)
	}
	_, _, err := Place(nil, needle, 100, 0.5, words)
	require.Error(t, err)
	_, _, err = Place(sentences, needle, 3, 0.5, words)
	require.Error(t, err)
}

func TestStringMatch(t *testing.T) {
	cases := []struct {
		resp, ans string
		want      float64
	}{
		{"The number is 8172943.", "8172943", 100},
		{"the BLUE  lighthouse", "blue lighthouse", 100},
		{"817 2943", "8172943", 0},
		{"", "x", 0},
		{"anything", "", 0},
	}
	for _, c := range cases {
		require.Equal(t, c.want, StringMatch(c.resp, c.ans), "%q vs %q", c.resp, c.ans)
	}
}

// A run killed while writing a row resumes: finished rows are kept, the
// torn line is skipped, new rows append cleanly and done cells are not run
// again.
func TestResumeAfterInterruption(t *testing.T) {
	path := filepath.Join(t.TempDir(), "results.jsonl")
	a, err := runinfo.OpenAppender(path)
	require.NoError(t, err)
	r1 := Row{Model: "m", Method: "retro", Budget: 1024, Length: 4096, Depth: 25, Score: 100, Exact: true}
	require.NoError(t, a.Write(r1))
	require.NoError(t, a.Close())
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	f.WriteString(`{"model":"m","method":"quest","bud`) // killed mid-write
	f.Close()

	rows, done, err := Resume(path)
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.True(t, done[r1.Key()])
	a, err = runinfo.OpenAppender(path)
	require.NoError(t, err)
	r2 := r1
	r2.Method = "quest"
	require.NoError(t, a.Write(r2))
	a.Close()
	rows, done, err = Resume(path)
	require.NoError(t, err)
	require.Len(t, rows, 2)
	require.True(t, done[r2.Key()])

	cfg := Config{Methods: []string{"retro", "quest", "dense"}, Budgets: []int{1024, 2048}, Lengths: []int{4096}, Depths: []float64{0.25, 0.5}}
	require.Equal(t, (2+2+1)*2, cfg.Total())
	cfg.Ingests = []Ingest{{Name: "dense"}, {Name: "streaming", Streaming: true, Budget: 1024}}
	require.Equal(t, (2+2+1)*2*2, cfg.Total())
	// A streamed document's row is another cell; a dense one keeps the
	// keys of runs made before ingest modes existed.
	r3 := r1
	r3.Ingest = "streaming"
	require.False(t, done[r3.Key()])
	require.Equal(t, "retro|1024|4096|25.000", r1.Key())
}

// End to end on the recall model: rows for every cell, retro finds the
// needles, window loses the middle one, a second run resumes with nothing
// left to do, and the heatmaps are written.
func TestRunRecall(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 4200, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	cfg := Config{Model: "recall", Methods: []string{"window", "retro"}, Budgets: []int{1024}, Lengths: []int{4096},
		Depths: []float64{0, 0.5}, Seed: 3, Recall: voc}
	var rows []Row
	err = Run(context.Background(), m, cfg, func(r Row) error { rows = append(rows, r); return nil })
	require.NoError(t, err)
	require.Len(t, rows, cfg.Total())
	for _, r := range rows {
		require.Equal(t, "recall", r.Model)
		require.NotEmpty(t, r.Needle)
		require.Positive(t, r.PrefillSec)
		require.Positive(t, r.ResidentBytes)
		switch {
		case r.Method == "retro":
			require.True(t, r.Exact, "%+v", r)
		case r.Depth == 50:
			require.False(t, r.Exact, "window cannot see the middle: %+v", r)
		}
	}
	done := map[string]bool{}
	for _, r := range rows {
		done[r.Key()] = true
	}
	cfg.Done = done
	err = Run(context.Background(), m, cfg, func(r Row) error { t.Fatalf("resumed run re-ran %s", r.Key()); return nil })
	require.NoError(t, err)

	dir := t.TempDir()
	names, err := Heatmaps(rows, dir)
	require.NoError(t, err)
	require.Equal(t, []string{"heatmap-window-1024", "heatmap-retro-1024", "heatmaps"}, names)
	for _, n := range names {
		for _, ext := range []string{".png", ".svg"} {
			st, err := os.Stat(filepath.Join(dir, n+ext))
			require.NoError(t, err)
			require.Positive(t, st.Size())
		}
	}
}

// Both ingest modes in one run, on the 4-layer salience variant (a
// layer's keys depend on earlier layers' attention): every cell is asked
// on a dense and on a streamed document, the rows say which, and both
// answer under dense attention and probe.
func TestRunStreamingIngest(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Layers: 4, PrevLayer: 1, RetrievalLayer: 2, Salience: true})
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 4200, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	cfg := Config{Model: "recall", Methods: []string{"dense", "probe"}, Budgets: []int{1024}, Lengths: []int{4096},
		Depths: []float64{0.5}, Seed: 3, Recall: voc, Ingests: []Ingest{{Name: "dense"}, {Name: "streaming", Streaming: true, Budget: 1024}}}
	var rows []Row
	require.NoError(t, Run(context.Background(), m, cfg, func(r Row) error { rows = append(rows, r); return nil }))
	require.Len(t, rows, 4)
	ingests := map[string]int{}
	for _, r := range rows {
		ingests[r.Ingest]++
		require.True(t, r.Exact, "%+v", r)
		require.Positive(t, r.IngestSec)
		require.GreaterOrEqual(t, r.IngestSec, r.PrefillSec)
		if r.Method == "probe" {
			require.Len(t, r.LayerBudgets, 4)
		}
	}
	require.Equal(t, map[string]int{"": 2, "streaming": 2}, ingests)
	names, err := Heatmaps(rows, t.TempDir())
	require.NoError(t, err)
	require.Contains(t, names, "heatmap-streaming-dense")
	require.Contains(t, names, "heatmap-streaming-probe-1024")

	cfg.Ingests = []Ingest{{Name: "streaming", Streaming: true}}
	require.ErrorContains(t, Run(context.Background(), m, cfg, func(Row) error { return nil }), "needs a positive budget")
}

// Text mode places an English needle and scores by string match.
func TestTextModeCell(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.StoriesV3(t), runtime.Options{Threads: 1, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	cfg := Config{Needle: DefaultNeedle, Haystack: GeneratedHaystack(50, 1), MaxTokens: 8}
	cl, err := cfg.build(m, 400, 0.5)
	require.NoError(t, err)
	require.LessOrEqual(t, len(cl.tokens)+len(cl.probes[0].question)+8, 400)
	text, err := m.Tokenizer().Decode(cl.tokens)
	require.NoError(t, err)
	require.Contains(t, text, ". "+DefaultNeedle.Needle+" ", "the needle sits between sentences")
	require.InDelta(t, 0.5, cl.depth, 0.1)
}

// Rows of a dense ingest keep the keys they had before ingests were a
// choice (old runs resume); other ingests get keys of their own, and every
// ingest multiplies the cells.
func TestIngestKeysAndTotal(t *testing.T) {
	dense := Row{Method: "dense", Length: 4096, Depth: 50}
	require.Equal(t, "dense|0|4096|50.000", dense.Key())
	dense.Ingest = "dense"
	require.Equal(t, "dense|0|4096|50.000", dense.Key())
	hyperAll := dense
	hyperAll.Ingest = "hyper:all"
	require.Equal(t, "hyper:all|dense|0|4096|50.000", hyperAll.Key())
	c := Config{Methods: []string{"dense", "retro"}, Budgets: []int{1024, 2048}, Lengths: []int{4096, 8192}, Depths: []float64{0.25, 0.5, 0.75}}
	require.Equal(t, 3*2*3, c.Total())
	c.Ingests = []Ingest{{Name: "dense"}, {Name: "hyper:all", Hyper: &runtime.HyperOptions{}}}
	require.Equal(t, 2*3*2*3, c.Total())
}
