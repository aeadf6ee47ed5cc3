// Package demo is `kvrecall demo`, kvrecall's main job on its embedded default: it builds the
// foundry's recall model if absent (no download), hides a needle in a
// generated ~16k-token haystack, ingests the haystack once as a document
// (with a progress bar), then asks the question three times: attending to
// ~2k tokens of pages chosen for the question (retro), the same with head
// masks (retro+heads: only the model's retrieval heads get those pages, the
// others sinks and recent tokens), and to every token (dense). It prints the
// answers, the timings and the device-resident KV.
package demo

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// Run runs `kvrecall demo args...`; ctx stops it.
func Run(ctx context.Context, args []string) error {
	cli.QuietLogs()
	fs := flag.NewFlagSet("kvrecall demo", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: kvrecall demo [flags]\n\nBuilds the recall model if absent, hides a needle in a generated haystack,\ningests it once and answers its question under retro, retro+heads and dense.\n\n")
		fs.PrintDefaults()
	}
	length := fs.Int("length", 16384, "haystack length in tokens")
	depth := fs.Float64("depth", -1, "needle depth in [0,1] (default: random)")
	threads := fs.Int("threads", 0, "CPU threads (default: all)")
	budget := fs.Int("budget", 2048, "tokens attended per question under retro")
	model := fs.String("model", "", "recall model (default: build the foundry's recall model if absent)")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "haystack seed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %v", fs.Args())
	}

	path := *model
	if path == "" {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return err
		}
		path, err = foundry.EnsureRecall(dir, func(p string) {
			fmt.Printf("Building the recall model (once) at %s ...\n", p)
		})
		if err != nil {
			return err
		}
	}
	f, err := gguf.Open(path)
	if err != nil {
		return err
	}
	voc, err := haystack.LoadVocab(f)
	if err != nil {
		return err
	}
	docs, err := os.MkdirTemp("", "kvrecall-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(docs)
	t0 := time.Now()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: *threads, ContextLength: *length + 64, DataDir: docs})
	if err != nil {
		return err
	}
	defer m.Close()
	fmt.Printf("Model %s (%s, %d layers, %d heads) loaded in %s\n", path, m.Config().Arch, m.Config().Layers, m.Config().Heads, time.Since(t0).Round(time.Millisecond))

	d := *depth
	if d < 0 {
		d = rand.New(rand.NewPCG(*seed, 1)).Float64()
	}
	c, err := voc.NewCase(*length, []float64{d}, *seed)
	if err != nil {
		return err
	}
	n := c.Needles[0]
	tok := m.Tokenizer()
	words := func(ids []int32) string {
		s, _ := tok.Decode(ids)
		return s[1:]
	}
	fmt.Printf("Haystack: %d tokens of filler words; the needle %q sits at token %d (depth %.0f%%).\n",
		len(c.Tokens), words(append([]int32{n.Key}, n.Values...)), n.Pos, 100*d)

	bar := progressbar.NewOptions(len(c.Tokens),
		progressbar.OptionSetDescription("ingest"),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString("tok"),
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish())
	t0 = time.Now()
	doc, err := m.IngestTokens(ctx, "demo", c.Tokens, func(done, total int) { bar.Set(done) })
	bar.Finish()
	if err != nil {
		return err
	}
	ingest := time.Since(t0)
	fmt.Printf("Ingested once: %d tokens in %s (%.0f tok/s), %d pages of %d tokens kept in RAM and on disk (%.1f MiB).\n",
		doc.Tokens, ingest.Round(time.Millisecond), float64(doc.Tokens)/ingest.Seconds(), doc.Pages, doc.PageSize, float64(doc.HostBytes)/(1<<20))

	q := voc.Question(n)
	fmt.Printf("Question: %s\n", words(q))
	wrong := false
	// retro+heads: the model's recorded retrieval heads get retro's pages,
	// every other KV head only sinks and recent tokens (DuoAttention).
	for _, pol := range []runtime.PolicyOptions{{Policy: "retro", Budget: *budget}, {Policy: "retro+heads", Budget: *budget}, {Policy: "dense"}} {
		s, err := m.DocumentSession(doc, pol)
		if err != nil {
			return err
		}
		res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
		resident := s.Cache().(*kvcache.Paged).Stats().ResidentBytes
		s.Close()
		if err != nil {
			return err
		}
		verdict := "correct"
		if !slices.Equal(res.Tokens, n.Values) {
			verdict, wrong = "WRONG, expected "+words(n.Values), true
		}
		label := "dense (every token)"
		if pol.Policy != "dense" {
			label = fmt.Sprintf("%s, budget %d", pol.Policy, pol.Budget)
		}
		fmt.Printf("Answer [%s]: %s  (%s)\n", label, res.Text[1:], verdict)
		fmt.Printf("  question %d tokens in %s, decode %.2f ms/token, device-resident KV %.1f MiB, document reused: %d tokens\n",
			res.PromptTokens, res.PrefillDuration.Round(time.Microsecond), float64(res.DecodeDuration.Microseconds())/1000/float64(max(1, res.GeneratedTokens)),
			float64(resident)/(1<<20), res.CachedTokens)
	}
	if wrong {
		return fmt.Errorf("wrong answer")
	}
	return nil
}
