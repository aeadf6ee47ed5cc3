// Package heads is `kvrecall heads`: it profiles a model's attention heads and writes the profile
// that head masks (DuoAttention-style retrieval/streaming KV heads) load:
//
//	kvrecall heads detect   --model FILE [--lengths 256,1024,4096] [--depths 0,25,50,75,100] [--seeds 1] [--threshold 0.1] [-o PROFILE.json]
//	kvrecall heads datafree --model FILE [--period 256] [--samples 4] [--seed 0] [--threshold 0.1] [-o PROFILE.json]
//
// Both write PROFILE.json and a heatmap of the scores beside it
// (PROFILE.png). See docs/heads.md.
package heads

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/heads/detect"
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/runtime"
)

// Usage is the command's help.
const Usage = `usage:
  kvrecall heads detect   --model FILE [--lengths 256,1024,4096] [--depths 0,25,50,75,100] [--seeds 1] [--threshold 0.1] [-o PROFILE.json]
  kvrecall heads datafree --model FILE [--period 256] [--samples 4] [--seed 0] [--threshold 0.1] [-o PROFILE.json]

detect   scores heads as the Retrieval Head paper does: needle-in-a-haystack
         prompts, greedy answers, +1/|answer| to a head each time its most
         attended position is the needle token being generated. Needs a
         recall model (mkmodel recall), whose metadata gives the vocabulary
         roles.
datafree scores echo and induction heads on a random token sequence
         repeated twice (RazorAttention); works on any model.

A KV head is "retrieval" if one of its query heads scores above the
threshold, otherwise "streaming". The profile (JSON, keyed by the model
file's fingerprint) and a heatmap PNG of the scores are written.
Run "kvrecall heads detect -h" or "kvrecall heads datafree -h" for every flag.
`

// Run runs `kvrecall heads args...`; ctx stops it. -h gives flag.ErrHelp.
func Run(ctx context.Context, args []string) error {
	cli.QuietLogs()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, Usage)
		if len(args) == 0 {
			return errors.New("missing command")
		}
		return nil
	}
	fs := flag.NewFlagSet("kvrecall heads "+args[0], flag.ContinueOnError)
	model := fs.String("model", "", "GGUF model file (required)")
	out := fs.String("o", "", "profile to write (default: the model file with .heads.json)")
	threshold := fs.Float64("threshold", heads.DefaultThreshold, "a query head scoring above this is a retrieval head")
	threads := fs.Int("threads", 0, "CPU threads (0: one per CPU)")
	var run func(m *runtime.Model) (*heads.Profile, error)
	contextLen := 0
	switch args[0] {
	case "detect":
		lengths := fs.String("lengths", "256,1024,4096", "haystack lengths in tokens, comma separated")
		depths := fs.String("depths", "0,25,50,75,100", "needle depths in percent, comma separated")
		seeds := fs.Int("seeds", 1, "prompts per length and depth")
		seed := fs.Uint64("seed", 0, "first prompt seed")
		fs.Usage = func() {
			fmt.Fprintf(fs.Output(), "usage: kvrecall heads detect --model FILE [flags]\n\nNIAH detection (Retrieval Head paper) on a recall model.\n\n")
			fs.PrintDefaults()
		}
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		ls, err := ints(*lengths)
		if err != nil {
			return fmt.Errorf("--lengths: %w", err)
		}
		ds, err := ints(*depths)
		if err != nil {
			return fmt.Errorf("--depths: %w", err)
		}
		o := detect.Options{Lengths: ls, Seeds: *seeds, Seed: *seed, Threshold: *threshold,
			Progress: func(done, total int) { fmt.Fprintf(os.Stderr, "\rprompt %d/%d", done, total) }}
		for _, d := range ds {
			if d < 0 || d > 100 {
				return fmt.Errorf("--depths: %d is outside 0..100", d)
			}
			o.Depths = append(o.Depths, float64(d)/100)
		}
		for _, l := range ls {
			contextLen = max(contextLen, l+64)
		}
		run = func(m *runtime.Model) (*heads.Profile, error) {
			p, err := detect.NIAH(ctx, m, o)
			fmt.Fprintln(os.Stderr)
			return p, err
		}
	case "datafree":
		period := fs.Int("period", 256, "random tokens per repeat")
		samples := fs.Int("samples", 4, "random sequences")
		seed := fs.Uint64("seed", 0, "seed for the random tokens")
		fs.Usage = func() {
			fmt.Fprintf(fs.Output(), "usage: kvrecall heads datafree --model FILE [flags]\n\nEcho and induction head scores on repeated random tokens (any model).\n\n")
			fs.PrintDefaults()
		}
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		contextLen = 2**period + 16
		run = func(m *runtime.Model) (*heads.Profile, error) {
			return detect.DataFree(ctx, m, detect.DataFreeOptions{Period: *period, Samples: *samples, Seed: *seed, Threshold: *threshold})
		}
	default:
		fmt.Fprint(os.Stderr, Usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	if *model == "" {
		return errors.New("--model FILE is required")
	}
	if *out == "" {
		*out = heads.DefaultPath(*model)
	}
	if !strings.HasSuffix(*out, ".json") {
		return fmt.Errorf("-o %s: the profile must be a .json file (the heatmap goes beside it as .png)", *out)
	}
	m, err := runtime.Open(ctx, *model, runtime.Options{Threads: *threads, ContextLength: contextLen})
	if err != nil {
		return err
	}
	defer m.Close()
	p, err := run(m)
	if err != nil {
		return err
	}
	if err := p.Save(*out); err != nil {
		return err
	}
	png := strings.TrimSuffix(*out, ".json") + ".png"
	if err := detect.Heatmap(p, png); err != nil {
		return err
	}
	for l, row := range p.Scores {
		fmt.Printf("layer %2d scores", l)
		for _, s := range row {
			fmt.Printf(" %.2f", s)
		}
		fmt.Printf("  KV heads %v\n", p.Classes[l])
	}
	fmt.Printf("retrieval heads (layer, head): %v\n", p.RetrievalHeads())
	fmt.Printf("streaming KV heads: %d of %d\n", p.StreamingKVHeads(), p.Layers*p.KVHeads)
	fmt.Printf("wrote %s and %s\n", *out, png)
	return nil
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}
