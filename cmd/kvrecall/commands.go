package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/device"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/cli"
)

// modelFlags are the flags of every command that opens a model.
type modelFlags struct {
	model, data string
	ctx         int
	threads     int
	device      string
	gpuLayers   int
}

func (f *modelFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.model, "model", "", "GGUF model file (default: the foundry's recall model, built if absent)")
	fs.StringVar(&f.data, "data", "", "directory of ingested documents (default: a folder per model in the user cache directory; the same as serve's)")
	fs.IntVar(&f.ctx, "ctx", 32768, "context length: the most tokens of document, prompt and answer")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads (0: one per CPU)")
	fs.StringVar(&f.device, "device", "cpu", "where the layers run: cpu, gpu (the first GPU) or a name from `kvrecall devices`")
	fs.IntVar(&f.gpuLayers, "gpu-layers", 0, "layers to offload to a GPU --device, as llama.cpp's -ngl (the last N; 0: all)")
}

// open loads the model the flags name; ggml's load logs stay quiet.
func (f *modelFlags) open(ctx context.Context, std stdio, method string, budget int) (*kvrecall.Model, error) {
	cli.QuietLogs()
	path := f.model
	if path == "" {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return nil, err
		}
		if path, err = foundry.EnsureRecall(dir, func(p string) {
			fmt.Fprintf(std.err, "building the recall model (once) at %s\n", p)
		}); err != nil {
			return nil, err
		}
	}
	return kvrecall.Open(ctx, path, kvrecall.Options{Threads: f.threads, ContextLength: f.ctx, DataDir: f.data, Method: method, Budget: budget,
		Device: f.device, GPULayers: f.gpuLayers})
}

// genFlags are the flags of commands that generate.
type genFlags struct {
	maxTokens   int
	temperature float64
	topK        int
	topP        float64
	seed        int
	stop        stringList
	method      string
	budget      int
	system      string
	stats       bool
	format      formatFlag
}

func (g *genFlags) register(fs *flag.FlagSet, withMethod bool) {
	fs.IntVar(&g.maxTokens, "max-tokens", 512, "most tokens in an answer (0: until the context is full)")
	fs.Float64Var(&g.temperature, "temperature", 0, "sampling temperature (0: greedy)")
	fs.IntVar(&g.topK, "top-k", 0, "sample from the k most likely tokens (0: all)")
	fs.Float64Var(&g.topP, "top-p", 0, "nucleus sampling (0 or 1: off)")
	fs.IntVar(&g.seed, "seed", -1, "sampling seed (-1: random)")
	fs.Var(&g.stop, "stop", "end the answer at this string (repeatable)")
	fs.StringVar(&g.system, "system", "", "system message before the prompt")
	fs.BoolVar(&g.stats, "stats", false, "print token counts, pages retrieved and speed to stderr")
	fs.Var(&g.format, "format", `constrain the answer: "json" for a JSON object, or a JSON Schema (inline, or @FILE)`)
	if withMethod {
		fs.StringVar(&g.method, "method", "retro", "paging method: "+strings.Join(kvrecall.Methods(), ", ")+", with +heads for head masks (e.g. retro+heads)")
		fs.IntVar(&g.budget, "budget", 2048, "tokens each query attends to (sinks and recent window included)")
	}
}

func (g *genFlags) options(out io.Writer) kvrecall.GenerateOptions {
	return kvrecall.GenerateOptions{
		MaxTokens: g.maxTokens, Stop: g.stop, Method: g.method, Budget: g.budget, Format: g.format.raw,
		Sampling: kvrecall.Sampling{Temperature: float32(g.temperature), TopK: g.topK, TopP: float32(g.topP), Seed: g.seed},
		OnToken: func(t kvrecall.Token) error {
			_, err := io.WriteString(out, t.Text)
			return err
		},
	}
}

func (g *genFlags) messages(prompt string) []kvrecall.Message {
	var msgs []kvrecall.Message
	if g.system != "" {
		msgs = append(msgs, kvrecall.Message{Role: "system", Content: g.system})
	}
	return append(msgs, kvrecall.Message{Role: "user", Content: prompt})
}

func (g *genFlags) report(std stdio, res *kvrecall.Response) {
	if !g.stats || res == nil {
		return
	}
	u := res.Usage
	fmt.Fprintf(std.err, "[%d prompt tokens (%d reused), %d generated, %d pages retrieved; prompt %s, %.1f tokens/s; stop: %s]\n",
		u.PromptTokens, u.CachedTokens, u.CompletionTokens, u.PagesRetrieved, res.Prefill.Round(time.Millisecond),
		float64(u.CompletionTokens)/max(res.Decode.Seconds(), 1e-9), res.StopReason)
}

// formatFlag is --format: "json", an inline JSON Schema or @FILE. The
// schema itself is checked when the model generates (kvrecall.ErrFormat,
// naming the bad keyword).
type formatFlag struct{ raw json.RawMessage }

func (f *formatFlag) String() string { return string(f.raw) }
func (f *formatFlag) Set(v string) error {
	switch {
	case v == "json":
		f.raw = json.RawMessage(`"json"`)
	case strings.HasPrefix(v, "@"):
		b, err := os.ReadFile(v[1:])
		if err != nil {
			return err
		}
		f.raw = b
	case strings.HasPrefix(strings.TrimSpace(v), "{"):
		f.raw = json.RawMessage(v)
	default:
		return fmt.Errorf(`want "json", a JSON Schema object or @FILE holding one`)
	}
	return nil
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// newFlags makes a subcommand's flag set with its help text.
func newFlags(std stdio, name, synopsis, about string) *flag.FlagSet {
	fs := flag.NewFlagSet("kvrecall "+name, flag.ContinueOnError)
	fs.SetOutput(std.err)
	fs.Usage = func() {
		fmt.Fprintf(std.out, "usage: kvrecall %s %s\n\n%s\n\nFlags:\n", name, synopsis, strings.TrimSpace(about))
		fs.SetOutput(std.out)
		fs.PrintDefaults()
		fs.SetOutput(std.err)
	}
	return fs
}

// envFlags are the subcommand flags that read KVRECALL_* variables (the
// README promises the first four; serve reads all of its own).
var envFlags = []string{"model", "data", "ctx", "threads", "device", "gpu-layers"}

func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	if err := cli.FromEnv(fs, envFlags...); err != nil {
		return nil, err
	}
	pos, err := cli.ParseInterleaved(fs, args)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		return nil, &cli.UsageError{Err: err}
	}
	return pos, err
}

func ingestCmd(ctx context.Context, args []string, std stdio) error {
	var mf modelFlags
	fs := newFlags(std, "ingest", "FILE [--id ID] [flags]", `
Prefills the text in FILE ("-": stdin) once and keeps its KV pages in host
memory and on disk under ID, for "kvrecall ask --doc ID" and for serve's
document requests. Ingesting the same text under the same ID again does
nothing; other text replaces the document. ID defaults to FILE's name
without its extension.`)
	mf.register(fs)
	id := fs.String("id", "", "document id: letters, digits, '.', '_', '-' (default: FILE's name)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return cli.Usagef("ingest takes one FILE (got %d arguments)", len(pos))
	}
	var text []byte
	if pos[0] == "-" {
		text, err = io.ReadAll(std.in)
	} else {
		text, err = os.ReadFile(pos[0])
		if *id == "" {
			*id = strings.TrimSuffix(filepath.Base(pos[0]), filepath.Ext(pos[0]))
		}
	}
	if err != nil {
		return err
	}
	m, err := mf.open(ctx, std, "", 0)
	if err != nil {
		return err
	}
	defer m.Close()
	t0 := time.Now()
	prefilled := false
	doc, err := m.Ingest(ctx, *id, string(text), kvrecall.IngestOptions{Progress: func(done, total int) {
		prefilled = true
		fmt.Fprintf(std.err, "\ringest: %d/%d tokens", done, total)
	}})
	if prefilled {
		fmt.Fprintln(std.err)
	}
	if err != nil {
		return err
	}
	in := doc.Info()
	if !prefilled {
		fmt.Fprintf(std.out, "%s: already ingested (%d tokens, %d pages)\n", in.ID, in.Tokens, in.Pages)
		return nil
	}
	d := time.Since(t0)
	fmt.Fprintf(std.out, "%s: %d tokens in %s (%.0f tokens/s), %d pages of %d tokens (%.1f MiB) in %s\n",
		in.ID, in.Tokens, d.Round(time.Millisecond), float64(in.Tokens)/d.Seconds(), in.Pages, in.PageSize,
		float64(in.HostBytes)/(1<<20), m.Options().DataDir)
	return nil
}

// prompt is the positional arguments joined, or else stdin.
func prompt(pos []string, std stdio) (string, error) {
	if len(pos) > 0 {
		return strings.Join(pos, " "), nil
	}
	b, err := io.ReadAll(std.in)
	return strings.TrimRight(string(b), "\n"), err
}

func askCmd(ctx context.Context, args []string, std stdio) error {
	var mf modelFlags
	var gf genFlags
	fs := newFlags(std, "ask", "--doc ID [flags] QUESTION...", `
Asks an ingested document a question (the arguments, or stdin) and streams
the answer. The document is not prefilled again: the question attends to
--budget tokens of its pages, chosen by --method. The question is rendered
with the model's chat template (--raw: appended as it is).`)
	mf.register(fs)
	gf.register(fs, true)
	doc := fs.String("doc", "", "document id (required)")
	raw := fs.Bool("raw", false, "append the question without the chat template")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if *doc == "" {
		return cli.Usagef("--doc ID is required (kvrecall docs ls lists them)")
	}
	q, err := prompt(pos, std)
	if err != nil {
		return err
	}
	if strings.TrimSpace(q) == "" {
		return cli.Usagef("the question is empty")
	}
	m, err := mf.open(ctx, std, gf.method, gf.budget)
	if err != nil {
		return err
	}
	defer m.Close()
	d, err := m.Document(*doc)
	if err != nil {
		return err
	}
	var res *kvrecall.Response
	if *raw {
		res, err = d.Ask(ctx, q, gf.options(std.out))
	} else {
		res, err = d.Chat(ctx, gf.messages(q), gf.options(std.out))
	}
	fmt.Fprintln(std.out)
	gf.report(std, res)
	return err
}

func docsCmd(ctx context.Context, args []string, std stdio) error {
	var mf modelFlags
	fs := newFlags(std, "docs", "ls | rm ID... [flags]", `
Lists the documents ingested for the model (ls), or removes them from
memory and disk (rm).`)
	mf.register(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		fs.Usage()
		return cli.Usagef("docs needs ls or rm")
	}
	switch pos[0] {
	case "ls", "list":
		if len(pos) > 1 {
			return cli.Usagef("docs ls takes no arguments")
		}
	case "rm", "remove":
		if len(pos) < 2 {
			return cli.Usagef("docs rm needs at least one ID")
		}
	default:
		return cli.Usagef("unknown docs command %q (ls, rm)", pos[0])
	}
	m, err := mf.open(ctx, std, "", 0)
	if err != nil {
		return err
	}
	defer m.Close()
	if pos[0] == "rm" || pos[0] == "remove" {
		for _, id := range pos[1:] {
			if err := m.DeleteDocument(id); err != nil {
				return err
			}
			fmt.Fprintf(std.out, "removed %s\n", id)
		}
		return nil
	}
	list, err := m.Documents()
	if err != nil {
		return err
	}
	if len(list) == 0 {
		fmt.Fprintf(std.err, "no documents in %s\n", m.Options().DataDir)
		return nil
	}
	tw := tabwriter.NewWriter(std.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTOKENS\tPAGES\tHOST MiB\tCREATED")
	for _, d := range list {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%s\n", d.ID, d.Tokens, d.Pages, float64(d.HostBytes)/(1<<20), d.Created.Local().Format("2006-01-02 15:04"))
	}
	return tw.Flush()
}

func runCmd(ctx context.Context, args []string, std stdio) error {
	var mf modelFlags
	var gf genFlags
	fs := newFlags(std, "run", "[flags] [PROMPT...]", `
Answers PROMPT (or stdin, when it is not a terminal) and exits, or, with no
prompt in a terminal (or with -i), chats: each line you type is a turn, the
conversation so far is the context. Type /reset to forget it, /bye or
Ctrl-D to leave. Prompts are rendered with the model's chat template
(--raw: a one-shot prompt is continued as it is). With --doc, the chat
follows an ingested document, attending to --budget tokens of its pages.`)
	mf.register(fs)
	gf.register(fs, true)
	doc := fs.String("doc", "", "chat after this ingested document")
	raw := fs.Bool("raw", false, "continue a one-shot prompt as it is, without the chat template")
	interactive := fs.Bool("i", false, "chat even when stdin is not a terminal")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	method := ""
	if *doc != "" {
		method = gf.method
	}
	opts := gf.options(std.out)
	opts.Method, opts.Budget = method, gf.budget
	if *doc != "" {
		opts.Document = *doc
	}
	repl := *interactive || (len(pos) == 0 && isTerminal(std.in))
	if repl && len(pos) > 0 {
		return cli.Usagef("-i chats from stdin: drop the prompt arguments")
	}
	if repl && *raw {
		return cli.Usagef("--raw continues one prompt as it is; a chat (-i, or no prompt in a terminal) needs the chat template")
	}
	var p string
	if !repl {
		if p, err = prompt(pos, std); err != nil {
			return err
		}
		if strings.TrimSpace(p) == "" {
			return cli.Usagef("the prompt is empty")
		}
	}
	m, err := mf.open(ctx, std, gf.method, gf.budget)
	if err != nil {
		return err
	}
	defer m.Close()
	if !repl {
		var res *kvrecall.Response
		if *raw {
			res, err = m.Generate(ctx, p, opts)
		} else {
			res, err = m.Chat(ctx, gf.messages(p), opts)
		}
		fmt.Fprintln(std.out)
		gf.report(std, res)
		return err
	}
	in := bufio.NewScanner(std.in)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	var history []kvrecall.Message
	if gf.system != "" {
		history = append(history, kvrecall.Message{Role: "system", Content: gf.system})
	}
	base := len(history)
	for {
		fmt.Fprint(std.out, ">>> ")
		if !in.Scan() {
			fmt.Fprintln(std.out)
			return in.Err()
		}
		line := strings.TrimSpace(in.Text())
		switch line {
		case "":
			continue
		case "/bye", "/exit", "/quit":
			return nil
		case "/reset":
			history = history[:base]
			fmt.Fprintln(std.out, "(conversation cleared)")
			continue
		}
		msgs := append(history, kvrecall.Message{Role: "user", Content: line})
		res, err := m.Chat(ctx, msgs, opts)
		fmt.Fprintln(std.out)
		gf.report(std, res)
		if err != nil {
			return err
		}
		history = append(msgs, kvrecall.Message{Role: "assistant", Content: res.Text})
	}
}

func isTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func devicesCmd(_ context.Context, args []string, std stdio) error {
	fs := newFlags(std, "devices", "[--json]", `
Lists the devices ggml can run a model on: the CPU backend compiled into
kvrecall, and backends loaded at start from shared libraries (ggml-cuda from
"make cuda", CPU variants from "make cpu-backends") found in
$OLLAMA_LIBRARY_PATH or in ../lib/ollama next to the executable. --device
takes a NAME from this list, "cpu" or "gpu" (docs/gpu.md).`)
	asJSON := fs.Bool("json", false, "print the list as JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return cli.Usagef("devices takes no arguments")
	}
	// ollama's loader logs what it found at info level; the list says it.
	cli.QuietLogs()
	devs := device.List()
	if *asJSON {
		enc := json.NewEncoder(std.out)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"devices": devs, "library_paths": device.LibraryPaths()})
	}
	tw := tabwriter.NewWriter(std.out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tKIND\tBACKEND\tFROM\tMEMORY\tDESCRIPTION\tFEATURES")
	for _, d := range devs {
		from := "built in"
		if d.Loaded {
			from = "loaded"
		}
		mem := "host"
		if d.TotalMemory > 0 {
			mem = fmt.Sprintf("%.1f/%.1f GiB free", float64(d.FreeMemory)/(1<<30), float64(d.TotalMemory)/(1<<30))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Name, d.Kind, d.Backend, from, mem, d.Description, strings.Join(d.Features, " "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(std.err, "backend libraries searched in: %s\n", device.Searched())
	return nil
}
