// Package mkmodel is `kvrecall mkmodel`, kvrecall's model foundry:
//
//	kvrecall mkmodel random  --arch llama|qwen2|qwen3|phi3|gemma2|gemma3 --preset tiny|1b|gemma2-tiny|gemma3-tiny --dtype f32|f16|q8_0|q4_0|q4_k|q5_k|q6_k|q4_k_m --seed N [--rope-freqs] -o FILE
//	kvrecall mkmodel recall  [--layers N --prev-layer L --retrieval-layer L | --deep] [--dtype f32|f16 --seed N] -o FILE
//	kvrecall mkmodel upgrade IN OUT
//
// random writes a model with random weights of a given shape; recall writes
// the constructed associative-recall model (needle-in-a-haystack capable,
// retrieval heads recorded in its metadata); upgrade re-encodes a GGUF v1
// file as v3, which llama.cpp requires.
package mkmodel

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
)

// Usage is the command's help.
const Usage = `usage:
  kvrecall mkmodel random  --arch llama|qwen2|qwen3|phi3|gemma2|gemma3 --preset tiny|1b|gemma2-tiny|gemma3-tiny [--dtype f32|f16|q8_0|q4_0|q4_k|q5_k|q6_k|q4_k_m] [--seed N] [--rope-freqs] -o FILE
  kvrecall mkmodel recall  [--layers N] [--prev-layer L] [--retrieval-layer L] [--deep] [--dtype f32|f16] [--seed N] -o FILE
  kvrecall mkmodel upgrade IN OUT

random   writes a model with random weights of a preset's shape (any of the
         four architectures, f32, f16 or a ggml quantization).
recall   writes the constructed associative-recall model: it really answers
         needle-in-a-haystack questions, and its metadata records its
         retrieval heads (docs/recall-model.md).
upgrade  re-encodes a GGUF v1 file as v3, which llama.cpp requires.
Run "kvrecall mkmodel random -h" or "kvrecall mkmodel recall -h" for every flag.
`

// Run runs `kvrecall mkmodel args...`.
func Run(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, Usage)
		return fmt.Errorf("missing command")
	}
	start := time.Now()
	switch args[0] {
	case "random":
		fs := flag.NewFlagSet("kvrecall mkmodel random", flag.ContinueOnError)
		arch := fs.String("arch", "llama", "architecture: llama, qwen2, qwen3, phi3, gemma2 or gemma3 (gemma with its gemma2-tiny/gemma3-tiny preset)")
		preset := fs.String("preset", "tiny", "shape: "+presetNames())
		dtype := fs.String("dtype", "f32", "weight type: f32, f16, q8_0, q4_0, q4_k, q5_k, q6_k or q4_k_m (ggml's own quantizer)")
		seed := fs.Uint64("seed", 1, "random seed (same seed, same file)")
		ropeFreqs := fs.Bool("rope-freqs", false, "frequency factors: llama's Llama-3-style rope_freqs.weight, or phi3's LongRoPE long/short factors (original context 256)")
		out := fs.String("o", "", "output file")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		shape, ok := foundry.Presets[*preset]
		if !ok {
			return fmt.Errorf("unknown preset %q (%s)", *preset, presetNames())
		}
		dt, err := foundry.ParseDType(*dtype)
		if err != nil {
			return err
		}
		if *out == "" {
			return fmt.Errorf("-o FILE is required")
		}
		if err := foundry.WriteRandom(*out, foundry.RandomOptions{Arch: *arch, Shape: shape, DType: dt, Seed: *seed, RopeFreqs: *ropeFreqs}); err != nil {
			return err
		}
	case "recall":
		fs := flag.NewFlagSet("kvrecall mkmodel recall", flag.ContinueOnError)
		layers := fs.Int("layers", 2, "number of layers (at least 2)")
		prev := fs.Int("prev-layer", 0, "layer of the previous-token head")
		retr := fs.Int("retrieval-layer", 0, "layer of the retrieval heads (default: the last)")
		salience := fs.Bool("salience", false, "head 1 of the retrieval layer only attends to the position after a key word and retrieves nothing (the default keeps both retrieval heads and adds that salience to head 1; docs/recall-model.md)")
		plain := fs.Bool("plain", false, "the foundry-v2 model: no head attends to a needle while it is read, so block representatives (probe) never see one (docs/recall-model.md)")
		dtype := fs.String("dtype", "f32", "weight type: f32 or f16")
		seed := fs.Uint64("seed", 0, "seed for the vocabulary roles and token codes")
		deep := fs.Bool("deep", false, "6-layer layout with retrieval heads in layers 2 and 4 and an echo head (for head detection); fixes the layers")
		out := fs.String("o", "", "output file")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		dt, err := foundry.ParseDType(*dtype)
		if err != nil {
			return err
		}
		if *out == "" {
			return fmt.Errorf("-o FILE is required")
		}
		o := foundry.RecallOptions{Layers: *layers, PrevLayer: *prev, RetrievalLayer: *retr, DType: dt, Seed: *seed, Deep: *deep, Salience: *salience, Plain: *plain}
		if *deep {
			set := false
			fs.Visit(func(f *flag.Flag) {
				set = set || f.Name == "layers" || f.Name == "prev-layer" || f.Name == "retrieval-layer"
			})
			if set {
				return fmt.Errorf("--deep fixes the layers: drop --layers, --prev-layer and --retrieval-layer")
			}
			o.Layers = 0
		}
		r, err := foundry.WriteRecall(*out, o)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "retrieval heads (layer, head): %v\n", r.RetrievalHeads)
		if len(r.EchoHeads) > 0 {
			fmt.Fprintf(os.Stderr, "echo heads (layer, head): %v\n", r.EchoHeads)
		}
	case "upgrade":
		if len(args) != 3 {
			return fmt.Errorf("upgrade takes IN and OUT")
		}
		f, err := gguf.Open(args[1])
		if err != nil {
			return err
		}
		if err := gguf.Upgrade(args[1], args[2]); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "GGUF v%d -> v3\n", f.Version)
	case "-h", "--help", "help":
		fmt.Print(Usage)
		return nil
	default:
		fmt.Fprint(os.Stderr, Usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
	fmt.Fprintf(os.Stderr, "wrote %s in %.1fs\n", args[len(args)-1], time.Since(start).Seconds())
	return nil
}

func presetNames() string {
	var s []string
	for n := range foundry.Presets {
		s = append(s, n)
	}
	if len(s) == 2 && s[0] > s[1] {
		s[0], s[1] = s[1], s[0]
	}
	return strings.Join(s, ", ")
}
