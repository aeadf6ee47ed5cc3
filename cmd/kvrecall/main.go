// Command kvrecall is kvrecall's one command: chat with a model or answer a
// prompt (run), ingest documents once and ask them questions (ingest, ask,
// docs), serve the model over HTTP (serve), and the tools around it (bench,
// mkmodel, heads, demo). `kvrecall --help` lists them.
//
// Build it with SIMD (ggml's CPU code is compiled by cgo; a plain go build
// runs 4-10x slower), see docs/building.md:
//
//	source build/env.sh && go install ./cmd/kvrecall   # after make setup
package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/bench"
	"github.com/kvrecall/kvrecall/internal/cli/demo"
	"github.com/kvrecall/kvrecall/internal/cli/heads"
	"github.com/kvrecall/kvrecall/internal/cli/mkmodel"
	"github.com/kvrecall/kvrecall/internal/cli/serve"
)

const usage = `kvrecall runs long-context LLM inference on GGUF models. The KV cache lives
in pages in host memory and on disk: a document is prefilled once, and each
question attends only to the pages it needs.

Usage:
  kvrecall <command> [flags] [arguments]

Commands:
  run       chat with a model in the terminal, or answer one prompt given as
            arguments or on stdin, streaming the answer
  ingest    prefill a text file once and keep its pages: ingest FILE --id ID
  ask       ask an ingested document: ask --doc ID QUESTION
  docs      list (docs ls) or remove (docs rm ID...) ingested documents
  serve     serve the model over HTTP (OpenAI- and Ollama-compatible)
  bench     benchmarks: speed, niah, ruler, load
  mkmodel   make GGUF models: random weights, the recall model; upgrade GGUF v1
  heads     profile attention heads for the +heads paging methods
  demo      the recall model finds a needle in a ~16k-token haystack
  devices   list the CPU and GPU devices layers can run on (--device)

Without --model, commands use the foundry's recall model, built on first use
(no download). --model, --data, --ctx, --threads, --device and --gpu-layers
can also be set as KVRECALL_MODEL, KVRECALL_DATA, KVRECALL_CTX,
KVRECALL_THREADS, KVRECALL_DEVICE and KVRECALL_GPU_LAYERS.

Run "kvrecall help <command>" for a command's flags.
`

func main() {
	cli.Main("kvrecall", func(ctx context.Context, args []string) error {
		return run(ctx, args, os.Stdin, os.Stdout, os.Stderr)
	})
}

// command is one subcommand: its one-line summary comes from usage above.
type command func(ctx context.Context, args []string, io stdio) error

// stdio are a command's streams (the tests give their own).
type stdio struct {
	in       io.Reader
	out, err io.Writer
}

func commands() map[string]command {
	return map[string]command{
		"run":    runCmd,
		"ingest": ingestCmd,
		"ask":    askCmd,
		"docs":   docsCmd,
		"serve":  func(_ context.Context, args []string, _ stdio) error { return serve.Run(args) },
		"bench":  func(ctx context.Context, args []string, _ stdio) error { return bench.Run(ctx, args) },
		"mkmodel": func(_ context.Context, args []string, _ stdio) error {
			return mkmodel.Run(args)
		},
		"heads":   func(ctx context.Context, args []string, _ stdio) error { return heads.Run(ctx, args) },
		"demo":    func(ctx context.Context, args []string, _ stdio) error { return demo.Run(ctx, args) },
		"devices": devicesCmd,
	}
}

func run(ctx context.Context, args []string, in io.Reader, out, errOut io.Writer) error {
	std := stdio{in: in, out: out, err: errOut}
	if len(args) == 0 {
		fmt.Fprint(errOut, usage)
		return cli.Usagef("missing command")
	}
	name, rest := args[0], args[1:]
	switch name {
	case "-h", "-help", "--help":
		fmt.Fprint(out, usage)
		return nil
	case "help":
		if len(rest) == 0 {
			fmt.Fprint(out, usage)
			return nil
		}
		name, rest = rest[0], []string{"-h"}
	}
	c, ok := commands()[name]
	if !ok {
		return cli.Usagef("unknown command %q (run \"kvrecall --help\" for the list)", name)
	}
	return c(ctx, rest, std)
}
