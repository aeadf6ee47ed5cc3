// Command demo is kvrecall's main job on its embedded default: it builds the
// foundry's recall model if absent (no download), hides a needle in a
// generated ~16k-token haystack, evaluates it with a progress bar, asks the
// question and prints the answer and the timings.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/runtime"
)

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	length := flag.Int("length", 16384, "haystack length in tokens")
	depth := flag.Float64("depth", -1, "needle depth in [0,1] (default: random)")
	threads := flag.Int("threads", 0, "CPU threads (default: all)")
	model := flag.String("model", "", "recall model (default: build the foundry's recall model if absent)")
	seed := flag.Uint64("seed", uint64(time.Now().UnixNano()), "haystack seed")
	flag.Parse()

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
	t0 := time.Now()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: *threads, ContextLength: *length + 16})
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
		return s
	}
	fmt.Printf("Haystack: %d tokens of filler words; the needle %q sits at token %d (depth %.0f%%).\n",
		len(c.Tokens), words(append([]int32{n.Key}, n.Values...))[1:], n.Pos, 100*d)

	s, err := m.NewSession()
	if err != nil {
		return err
	}
	defer s.Close()
	bar := progressbar.NewOptions(len(c.Tokens),
		progressbar.OptionSetDescription("prefill"),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString("tok"),
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish())
	q := voc.Question(n)
	fmt.Printf("Question:%s\n", words(q))
	t0 = time.Now()
	_, err = s.Eval(ctx, c.Tokens, false, func(done, total int) { bar.Set(done) })
	bar.Finish()
	if err != nil {
		return err
	}
	prefill := time.Since(t0)
	res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
	if err != nil {
		return err
	}
	verdict := "correct"
	if !slices.Equal(res.Tokens, n.Values) {
		verdict = "WRONG, expected" + words(n.Values)
	}
	fmt.Printf("Answer:  %s  (%s)\n", res.Text[1:], verdict)
	fmt.Printf("Timings: prefill %d tokens in %s (%.0f tok/s); question %d tokens; decode %.1f ms/token\n",
		len(c.Tokens), prefill.Round(time.Millisecond), float64(len(c.Tokens))/prefill.Seconds(), res.PromptTokens,
		float64(res.DecodeDuration.Microseconds())/1000/float64(max(1, res.GeneratedTokens)))
	if verdict != "correct" {
		return fmt.Errorf("wrong answer")
	}
	return nil
}
