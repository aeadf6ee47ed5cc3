// Package bench is `kvrecall bench`: kvrecall's benchmarks. Results are
// ratios against baselines measured in the same run; docs/performance.md
// records them with the commands that produced them.
//
//	kvrecall bench speed [--preset tiny,1b,gemma3-tiny | --model FILE] [--contexts 2048,8192] [--threads 1,2]
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/kvrecall/kvrecall/bench/load"
	"github.com/kvrecall/kvrecall/bench/niah"
	"github.com/kvrecall/kvrecall/bench/parity"
	"github.com/kvrecall/kvrecall/bench/ruler"
	"github.com/kvrecall/kvrecall/bench/runinfo"
	"github.com/kvrecall/kvrecall/bench/speed"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/probe"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/server"
	"github.com/kvrecall/kvrecall/squeezed"
)

const usage = `usage:
  bench speed [--preset tiny,1b,gemma3-tiny | --model FILE] [--contexts 2048,8192] [--threads 1,2] [--decode 32] [--json FILE]
  bench speed --paged [--preset tiny] [--contexts 16384,32768,65536] [--threads 2] [--budget 2048] [--methods retro,quest] [--floor 2048]
              [--hyper all|LAYERS] [--skip-dense] [--skip-llama] [--data-dir DIR] [--token-pools]
  bench load  [--preset tiny | --model FILE] [--clients 1,4,16] [--requests 48] [--max-tokens 16] [--max-concurrent 2]
  bench ruler [--model FILE] [--tasks niah_single,...] [--lengths 4096,...,65536] [--samples 3]
              [--method dense,retro] [--budget 2048] [--out DIR]
  bench niah  [--model FILE] [--method dense,window,quest,retro] [--budget 1024,2048]
              [--lengths 16384,32768] [--depths 0,25,50,75,100] [--needles 1] [--json FILE]
              [--ingest dense,hyper:all,hyper:but0,hyper:last]
  bench parity --device gpu [--gpu-layers N] [--models FILE,...] [--json FILE]
              the same models on the device and on the CPU: logits and greedy tokens
Every benchmark but load takes --device and --gpu-layers (docs/gpu.md).
`

func floats(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		x, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil {
			return nil, fmt.Errorf("bad number %q in %q", f, s)
		}
		out = append(out, x)
	}
	return out, nil
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad number %q in %q", f, s)
		}
		out = append(out, n)
	}
	return out, nil
}

// Run runs `kvrecall bench args...`; ctx stops it.
func Run(ctx context.Context, args []string) error {
	cli.QuietLogs()
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("missing benchmark name")
	}
	switch args[0] {
	case "speed":
		return runSpeed(ctx, args[1:])
	case "niah":
		return runNIAH(ctx, args[1:])
	case "load":
		return runLoad(ctx, args[1:])
	case "ruler":
		return runRuler(ctx, args[1:])
	case "parity":
		return runParity(ctx, args[1:])
	case "-h", "--help", "help":
		fmt.Print(usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown benchmark %q", args[0])
}

func runSpeed(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("speed", flag.ContinueOnError)
	var dev deviceFlags
	dev.register(fs)
	presets := fs.String("preset", "tiny", "foundry presets to build and measure (f16 weights), comma separated")
	model := fs.String("model", "", "measure this GGUF instead of presets")
	contexts := fs.String("contexts", "2048,8192", "prompt lengths")
	threads := fs.String("threads", "1,2", "thread counts")
	decode := fs.Int("decode", 32, "decode steps timed after each prefill")
	jsonOut := fs.String("json", "", "also write the rows as JSON to this file")
	paged := fs.Bool("paged", false, "long-context decode: paged methods vs dense attention vs llama.cpp (prefill with the first thread count)")
	decodeThreads := fs.Int("decode-threads", 1, "paged: threads for the timed decode steps")
	outDir := fs.String("out", "", "paged: run folder for results and plots (default: bench/results/speed-<time>)")
	budget := fs.Int("budget", 2048, "paged: token budget")
	methods := fs.String("methods", "retro,quest", "paged: methods besides dense (any of "+paging.Known()+")")
	headsProfile := fs.String("heads-profile", "", "paged: head profile for +heads methods: a profile file (cmd/heads) or \"half\" (upper half of each layer's KV heads streaming); default: the heads the model records")
	hyperLayers := fs.String("hyper", "", "paged: also ingest with HyperAttention (paper defaults) on these layers, comma separated, or \"all\", and compare with the dense ingest and llama.cpp; default: dense ingest only")
	skipDense := fs.Bool("skip-dense", false, "paged, with --hyper: skip the dense ingest (decode reads the HyperAttention ingest's document)")
	skipLlama := fs.Bool("skip-llama", false, "paged: skip llama.cpp (its prefill and decode steps; its quadratic prefill takes >10 minutes at 128k)")
	probeSpec := fs.String("probe", "", `probe's settings as JSON, as serve takes them: '{"block_size":128,"question_weight":4,"neighbors":-1}' (default: probe's defaults)`)
	floor := fs.Int("floor", 0, "paged: also decode densely at a context of this many tokens (issue 14's floor for a budget of as many tokens), in the same alternation, and print each method's ratio to it (0: off)")
	dataDir := fs.String("data-dir", "", "paged: keep the ingested documents in this folder and reuse them on later runs with the same model, length and ingest (default: a temporary folder, removed)")
	tokenPools := fs.Bool("token-pools", false, "paged: squeezed's token groups keep token pools (LRU, uploads) on the CPU too, instead of staging buffers refilled each step from the document's cluster-ordered copy (kvcache.TokenStaging off: the path before issue 14's staging, for comparison)")
	graphUploads := fs.Bool("graph-uploads", false, "paged: pools outside host memory (a GPU's) take their page uploads as graph inputs, as before device staging (kvcache.DeviceUploads off), for comparison")
	streaming := fs.Bool("streaming", false, "paged: also ingest each document with probe's streaming prefill within --budget, timed against the dense ingest and llama.cpp (decode uses the dense document)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *tokenPools {
		kvcache.TokenStaging = false
	}
	if *graphUploads {
		kvcache.DeviceUploads = false
	}
	cs, err := ints(*contexts)
	if err != nil {
		return err
	}
	ts, err := ints(*threads)
	if err != nil {
		return err
	}
	type target struct{ label, path string }
	var targets []target
	if *model != "" {
		targets = append(targets, target{*model, *model})
	} else {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return err
		}
		for _, p := range strings.Split(*presets, ",") {
			path, err := foundry.EnsurePreset(dir, foundry.PresetArch(p), p, foundry.F16, func(path string) {
				fmt.Fprintf(os.Stderr, "building %s ...\n", path)
			})
			if err != nil {
				return err
			}
			targets = append(targets, target{p + " (f16)", path})
		}
	}
	if *paged {
		hyperOpts, err := parseHyper(*hyperLayers)
		if err != nil {
			return err
		}
		if *skipDense && hyperOpts == nil {
			return fmt.Errorf("--skip-dense needs --hyper: some ingest must make the document")
		}
		extra, err := probeExtra(*probeSpec)
		if err != nil {
			return err
		}
		var all []speed.PagedRow
		ms := strings.Split(*methods, ",")
		for _, t := range targets {
			rows, err := speed.RunPaged(ctx, speed.PagedConfig{Model: t.path, Label: t.label, Contexts: cs, Threads: ts[0], DecodeThreads: *decodeThreads,
				Budget: *budget, Methods: ms, DecodeTokens: *decode, HeadProfile: *headsProfile, Hyper: hyperOpts,
				SkipDense: *skipDense, SkipLlama: *skipLlama, Streaming: *streaming, Extra: extra, Floor: *floor, DataDir: *dataDir,
				Device: dev.device, GPULayers: dev.gpuLayers,
				Log: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }})
			all = append(all, rows...)
			if err != nil {
				fmt.Print(speed.PagedTable(all, ms))
				return err
			}
		}
		fmt.Printf("\nbench %s\n\n", strings.Join(append([]string{"speed"}, args...), " "))
		fmt.Print(speed.PagedTable(all, ms))
		dir := *outDir
		if dir == "" {
			dir = runinfo.DefaultDir("speed")
		}
		if err := runinfo.Prepare(dir, append([]string{"bench", "speed"}, args...)); err != nil {
			return err
		}
		b, _ := json.MarshalIndent(all, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "results.json"), b, 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "table.md"), []byte(speed.PagedTable(all, ms)), 0o644); err != nil {
			return err
		}
		if err := speed.PagedPlots(all, ms, dir); err != nil {
			return err
		}
		fmt.Printf("\nresults and plots in %s\n", dir)
		if *jsonOut != "" {
			return os.WriteFile(*jsonOut, b, 0o644)
		}
		return nil
	}
	var all []speed.DenseRow
	for _, t := range targets {
		rows, err := speed.RunDense(ctx, speed.DenseConfig{Model: t.path, Label: t.label, Contexts: cs, Threads: ts, DecodeTokens: *decode, Log: os.Stderr,
			Device: dev.device, GPULayers: dev.gpuLayers})
		all = append(all, rows...)
		if err != nil {
			fmt.Print(speed.DenseTable(all))
			return err
		}
	}
	fmt.Printf("\nbench %s\n\n", strings.Join(append([]string{"speed"}, args...), " "))
	fmt.Print(speed.DenseTable(all))
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(all, "", "  ")
		return os.WriteFile(*jsonOut, b, 0o644)
	}
	return nil
}

func runNIAH(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("niah", flag.ContinueOnError)
	var dev deviceFlags
	dev.register(fs)
	model := fs.String("model", "", "GGUF model (default: the foundry's recall model, built if absent)")
	methods := fs.String("method", "retro", "paging methods, comma separated: "+paging.Known())
	headsProfile := fs.String("heads-profile", "", "head profile for +heads methods: a profile file (cmd/heads detect) or \"half\"; default: the heads the model records, or model.heads.json beside it")
	budgets := fs.String("budget", "2048", "token budgets, comma separated")
	lengths := fs.String("lengths", "16384,32768", "context lengths in tokens")
	depths := fs.String("depths", "0,25,50,75,100", "needle depths in percent (ignored with --depth-intervals)")
	intervals := fs.Int("depth-intervals", 0, "number of depths from 0 to 100 %, spaced by --spacing")
	spacing := fs.String("spacing", "linear", "depth spacing: linear or sigmoid")
	needles := fs.Int("needles", 1, "needles per haystack (recall model: clustered around the depth, each asked)")
	seed := fs.Uint64("seed", 1, "haystack seed")
	threads := fs.Int("threads", 0, "CPU threads (default: all)")
	out := fs.String("out", "", "run folder (default: bench/results/niah-<time>); an existing one resumes")
	hay := fs.String("haystack", "", "text mode: haystack text file (default: generated sentences)")
	needle := fs.String("needle", niah.DefaultNeedle.Needle, "text mode: the needle sentence")
	question := fs.String("question", niah.DefaultNeedle.Question, "text mode: the question")
	answer := fs.String("answer", niah.DefaultNeedle.Answer, "text mode: the string a correct answer contains")
	maxTokens := fs.Int("max-tokens", 16, "text mode: answer tokens")
	ingestSpec := fs.String("ingest", "dense", "prefills of each haystack, comma separated, each answered under every method: dense, streaming (probe's streaming prefill within --streaming-budget), or hyper:all, hyper:but0 (every layer but 0), hyper:last or hyper:L1+L2 (HyperAttention, paper defaults, on those layers)")
	streamingBudget := fs.Int("streaming-budget", 2048, "tokens each window of a streaming ingest attends to")
	probeSpec := fs.String("probe", "", `probe's settings as JSON, as serve takes them: '{"block_size":128,"question_weight":4,"neighbors":-1}' (default: probe's defaults)`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	ls, err := ints(*lengths)
	if err != nil {
		return err
	}
	bs, err := ints(*budgets)
	if err != nil {
		return err
	}
	var ds []float64
	if *intervals > 0 {
		if ds, err = niah.Depths(*intervals, *spacing); err != nil {
			return err
		}
	} else {
		if ds, err = floats(*depths); err != nil {
			return err
		}
		for i := range ds {
			if ds[i] < 0 || ds[i] > 100 {
				return fmt.Errorf("depth %v%% is outside 0..100", ds[i])
			}
			ds[i] /= 100
		}
	}
	ms, err := methodList(*methods)
	if err != nil {
		return err
	}
	path, f, err := benchModel(*model)
	if err != nil {
		return err
	}
	cfg := niah.Config{Model: filepath.Base(path), Methods: ms, Budgets: bs, Lengths: ls, Depths: ds, Needles: *needles, Seed: *seed,
		Needle: niah.TextNeedle{Needle: *needle, Question: *question, Answer: *answer}, MaxTokens: *maxTokens,
	}
	if cfg.Extra, err = probeExtra(*probeSpec); err != nil {
		return err
	}
	if voc, err := haystack.LoadVocab(f); err == nil {
		cfg.Recall = voc
	} else if *hay != "" {
		b, err := os.ReadFile(*hay)
		if err != nil {
			return err
		}
		cfg.Haystack = niah.Sentences(string(b))
	}
	dir := *out
	if dir == "" {
		dir = runinfo.DefaultDir("niah")
	}
	if err := runinfo.Prepare(dir, append([]string{"bench", "niah"}, args...)); err != nil {
		return err
	}
	resultsPath := filepath.Join(dir, "results.jsonl")
	rows, done, err := niah.Resume(resultsPath)
	if err != nil {
		return err
	}
	cfg.Done = done
	if len(done) > 0 {
		fmt.Fprintf(os.Stderr, "resuming %s: %d cells already done\n", dir, len(done))
	}
	app, err := runinfo.OpenAppender(resultsPath)
	if err != nil {
		return err
	}
	defer app.Close()
	m, cleanup, err := openWithScratchDocs(ctx, path, *threads, slices.Max(ls)+64, *headsProfile, ms, dev)
	if err != nil {
		return err
	}
	defer cleanup()
	if cfg.Ingests, err = parseIngests(*ingestSpec, m.Config().Layers, *streamingBudget); err != nil {
		return err
	}

	todo := cfg.Total() - len(done)
	bar := progressbar.NewOptions(max(todo, 1), progressbar.OptionSetDescription("cells"), progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionShowCount(), progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(500*time.Millisecond))
	cfg.Progress = func(stage string, d, total int) { bar.Describe(fmt.Sprintf("%s (%d%%)", stage, 100*d/total)) }
	err = niah.Run(ctx, m, cfg, func(r niah.Row) error {
		bar.Clear()
		fmt.Println(r.Line())
		rows = append(rows, r)
		bar.Add(1)
		return app.Write(r)
	})
	bar.Finish()
	fmt.Println(niah.Summary(rows))
	if len(rows) > 0 {
		names, perr := niah.Heatmaps(rows, dir)
		if perr != nil {
			return perr
		}
		fmt.Printf("results: %s; heatmaps: %s\n", resultsPath, strings.Join(names, ", "))
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "interrupted: %d cells are kept in %s; run the same command with --out %s to resume\n", len(rows), resultsPath, dir)
		return nil
	}
	return err
}

func runLoad(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	preset := fs.String("preset", "tiny", "foundry preset to serve (f16)")
	model := fs.String("model", "", "serve this GGUF instead")
	clients := fs.String("clients", "1,4,16", "concurrent clients, comma separated")
	requests := fs.Int("requests", 48, "requests per client count")
	maxTokens := fs.Int("max-tokens", 16, "tokens generated per request")
	promptWords := fs.Int("prompt-words", 100, "words in each prompt")
	maxConc := fs.Int("max-concurrent", 2, "server: requests generating at once")
	threads := fs.Int("threads", 0, "server: CPU threads (default: all)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cs, err := ints(*clients)
	if err != nil {
		return err
	}
	path := *model
	if path == "" {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return err
		}
		if path, err = foundry.EnsurePreset(dir, foundry.PresetArch(*preset), *preset, foundry.F16, nil); err != nil {
			return err
		}
	}
	data, err := os.MkdirTemp("", "kvrecall-load-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(data)
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: *threads, ContextLength: 4096, DataDir: data})
	if err != nil {
		return err
	}
	defer m.Close()
	srv := server.New(server.Config{MaxConcurrent: *maxConc, QueueLength: 1024})
	if err := srv.SetModel(m, 0); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(ln)
	defer hs.Close()
	url := "http://" + ln.Addr().String()
	prompt := strings.TrimSpace(strings.Repeat("the little dog ran to the park and ", (*promptWords+7)/8))
	var rs []load.Result
	for _, c := range cs {
		r, err := load.Run(ctx, load.Config{URL: url, Clients: c, Requests: *requests, Prompt: prompt, MaxTokens: *maxTokens})
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "%d clients: %.2f req/s, p50 %.1f ms, p99 %.1f ms\n", c, r.RPS, r.P50, r.P99)
		rs = append(rs, r)
	}
	fmt.Printf("\nbench %s   (server: --max-concurrent %d, model %s)\n\n", strings.Join(append([]string{"load"}, args...), " "), *maxConc, path)
	fmt.Print(load.Table(rs))
	return nil
}

func runRuler(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ruler", flag.ContinueOnError)
	var dev deviceFlags
	dev.register(fs)
	model := fs.String("model", "", "GGUF model (default: the foundry's recall model, built if absent)")
	tasks := fs.String("tasks", strings.Join(ruler.Tasks, ","), "tasks: "+strings.Join(ruler.Tasks, ", "))
	lengths := fs.String("lengths", "4096,8192,16384,32768,65536", "context lengths in tokens")
	samples := fs.Int("samples", 3, "samples per task and length")
	methods := fs.String("method", "dense,retro", "paging methods, comma separated: "+paging.Known())
	headsProfile := fs.String("heads-profile", "", "head profile for +heads methods: a profile file (cmd/heads detect) or \"half\"; default: the heads the model records, or model.heads.json beside it")
	budgets := fs.String("budget", "2048", "token budgets, comma separated")
	seed := fs.Uint64("seed", 1, "seed")
	threads := fs.Int("threads", 0, "CPU threads (default: all)")
	out := fs.String("out", "", "run folder (default: bench/results/ruler-<time>); an existing one resumes")
	probeSpec := fs.String("probe", "", `probe's settings as JSON, as serve takes them: '{"block_size":128,"question_weight":4,"neighbors":-1}' (default: probe's defaults)`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	ls, err := ints(*lengths)
	if err != nil {
		return err
	}
	bs, err := ints(*budgets)
	if err != nil {
		return err
	}
	ts := strings.Split(*tasks, ",")
	for _, t := range ts {
		if !slices.Contains(ruler.Tasks, t) {
			return fmt.Errorf("unknown task %q (%s)", t, strings.Join(ruler.Tasks, ", "))
		}
	}
	ms, err := methodList(*methods)
	if err != nil {
		return err
	}
	path, f, err := benchModel(*model)
	if err != nil {
		return err
	}
	cfg := ruler.Config{Model: filepath.Base(path), Tasks: ts, Lengths: ls, Samples: *samples, Methods: ms, Budgets: bs, Seed: *seed}
	if cfg.Extra, err = probeExtra(*probeSpec); err != nil {
		return err
	}
	if voc, err := haystack.LoadVocab(f); err == nil {
		cfg.Recall = voc
	}
	dir := *out
	if dir == "" {
		dir = runinfo.DefaultDir("ruler")
	}
	if err := runinfo.Prepare(dir, append([]string{"bench", "ruler"}, args...)); err != nil {
		return err
	}
	resultsPath := filepath.Join(dir, "results.jsonl")
	rows, err := runinfo.ReadLines[ruler.Row](resultsPath)
	if err != nil {
		return err
	}
	cfg.Done = map[string]bool{}
	for _, r := range rows {
		cfg.Done[r.Key()] = true
	}
	app, err := runinfo.OpenAppender(resultsPath)
	if err != nil {
		return err
	}
	defer app.Close()
	m, cleanup, err := openWithScratchDocs(ctx, path, *threads, slices.Max(ls)+64, *headsProfile, ms, dev)
	if err != nil {
		return err
	}
	defer cleanup()
	bar := progressbar.NewOptions(max(1, cfg.Total()-len(cfg.Done)), progressbar.OptionSetDescription("samples"), progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionShowCount(), progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(500*time.Millisecond))
	err = ruler.Run(ctx, m, cfg, func(r ruler.Row) error {
		rows = append(rows, r)
		bar.Add(1)
		return app.Write(r)
	})
	bar.Finish()
	sums := ruler.Summarize(rows)
	if werr := os.WriteFile(filepath.Join(dir, "summary.csv"), []byte(ruler.CSV(sums)), 0o644); werr != nil {
		return werr
	}
	md := ruler.Markdown(sums)
	if lb := ruler.LayerBudgets(rows); lb != "" {
		md += "\nPer-layer budgets (tokens attended, layer 0 first):\n\n" + lb
	}
	if werr := os.WriteFile(filepath.Join(dir, "summary.md"), []byte(md), 0o644); werr != nil {
		return werr
	}
	fmt.Printf("\nbench %s\n\n%s\nresults in %s\n", strings.Join(append([]string{"ruler"}, args...), " "), md, dir)
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "interrupted: finished samples are kept; run the same command with --out %s to resume\n", dir)
		return nil
	}
	return err
}

// methodList parses a comma-separated list of paging methods.
func methodList(s string) ([]string, error) {
	ms := strings.Split(s, ",")
	for _, m := range ms {
		if _, _, err := paging.Parse(m); err != nil {
			return nil, err
		}
	}
	return ms, nil
}

// benchModel returns the model to benchmark: path, or the foundry's recall
// model (built if absent), with its parsed header.
func benchModel(path string) (string, *gguf.File, error) {
	if path == "" {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return "", nil, err
		}
		if path, err = foundry.EnsureRecall(dir, func(p string) { fmt.Fprintf(os.Stderr, "building %s ...\n", p) }); err != nil {
			return "", nil, err
		}
	}
	f, err := gguf.Open(path)
	return path, f, err
}

// openWithScratchDocs opens a model whose documents go to a temporary
// directory that cleanup removes (benchmarks ingest their own haystacks).
// If a method is squeezed, documents are clustered at ingest.
func openWithScratchDocs(ctx context.Context, path string, threads, contextLength int, headsProfile string, methods []string, dev deviceFlags) (*runtime.Model, func(), error) {
	docs, err := os.MkdirTemp("", "kvrecall-bench-")
	if err != nil {
		return nil, nil, err
	}
	var sq *squeezed.Options
	for _, meth := range methods {
		if strings.HasPrefix(meth, "squeezed") {
			sq = &squeezed.Options{}
		}
	}
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: threads, ContextLength: contextLength, DataDir: docs, Squeezed: sq, Device: dev.device, GPULayers: dev.gpuLayers})
	if err != nil {
		os.RemoveAll(docs)
		return nil, nil, err
	}
	if err := runtime.ApplyHeadProfile(m, headsProfile); err != nil {
		m.Close()
		os.RemoveAll(docs)
		return nil, nil, err
	}
	return m, func() { m.Close(); os.RemoveAll(docs) }, nil
}

// parseIngests turns niah's --ingest into prefills for a model of layers
// layers: "dense", or "hyper:" and all, but0 (every layer but 0, where the
// recall model's previous-token head is), last, or layers joined by "+".
func parseIngests(spec string, layers, streamingBudget int) ([]niah.Ingest, error) {
	var out []niah.Ingest
	for _, f := range strings.Split(spec, ",") {
		f = strings.TrimSpace(f)
		switch f {
		case "dense":
			out = append(out, niah.Ingest{Name: f})
			continue
		case "streaming":
			if streamingBudget <= 0 {
				return nil, fmt.Errorf("--streaming-budget must be positive, got %d", streamingBudget)
			}
			out = append(out, niah.Ingest{Name: f, Streaming: true, Budget: streamingBudget})
			continue
		}
		which, ok := strings.CutPrefix(f, "hyper:")
		if !ok {
			return nil, fmt.Errorf("--ingest: %q is neither dense, streaming nor hyper:LAYERS", f)
		}
		o := &runtime.HyperOptions{Config: hyper.Default()}
		switch which {
		case "all":
		case "but0":
			for l := 1; l < layers; l++ {
				o.Layers = append(o.Layers, l)
			}
		case "last":
			o.Layers = []int{layers - 1}
		default:
			for _, x := range strings.Split(which, "+") {
				l, err := strconv.Atoi(x)
				if err != nil {
					return nil, fmt.Errorf("--ingest: %q: %q is not a layer number (or use all, but0, last)", f, x)
				}
				o.Layers = append(o.Layers, l)
			}
		}
		if len(o.Layers) == 0 && which != "all" {
			return nil, fmt.Errorf("--ingest: %q selects no layer of this %d-layer model", f, layers)
		}
		out = append(out, niah.Ingest{Name: f, Hyper: o})
	}
	return out, nil
}

// parseHyper turns --hyper into ingest options: "" is a dense ingest, "all"
// every layer, else a comma-separated list of layers (paper defaults).
func parseHyper(spec string) (*runtime.HyperOptions, error) {
	if spec == "" {
		return nil, nil
	}
	o := &runtime.HyperOptions{Config: hyper.Default()}
	if spec == "all" {
		return o, nil
	}
	for _, f := range strings.Split(spec, ",") {
		l, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("--hyper: %q is not a layer number (or use \"all\")", f)
		}
		o.Layers = append(o.Layers, l)
	}
	return o, nil
}

// probeExtra turns --probe's JSON into runtime.PolicyOptions.Extra (nil
// for ""). Settings that depend on the model (block size against the page
// size, ...) are checked when a session is built, with errors naming them.
func probeExtra(spec string) (map[string]any, error) {
	if spec == "" {
		return nil, nil
	}
	s, err := probe.ParseSettings(spec)
	if err != nil {
		return nil, fmt.Errorf("--probe: %w", err)
	}
	return map[string]any{probe.OptionKey: s}, nil
}

// deviceFlags place a benchmark's models (runtime.Options.Device,
// GPULayers; llama.cpp's layers too in bench speed).
type deviceFlags struct {
	device    string
	gpuLayers int
}

func (d *deviceFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&d.device, "device", "cpu", "where the layers run: cpu, gpu (the first GPU) or a name from `kvrecall devices` (docs/gpu.md)")
	fs.IntVar(&d.gpuLayers, "gpu-layers", 0, "layers to offload to a GPU --device, as llama.cpp's -ngl (the last N; 0: all)")
}

func runParity(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("parity", flag.ContinueOnError)
	var dev deviceFlags
	dev.register(fs)
	models := fs.String("models", "", "GGUF files, comma separated (default: the foundry's tiny llama and qwen2 presets, f32, and its recall model)")
	threads := fs.Int("threads", 0, "CPU threads (default: all)")
	tol := fs.Float64("tol", 1e-3, "largest logit difference allowed, as a fraction of the CPU's largest |logit|")
	jsonOut := fs.String("json", "", "also write the rows as JSON to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var paths []string
	if *models != "" {
		paths = strings.Split(*models, ",")
	} else {
		dir, err := foundry.ModelsDir()
		if err != nil {
			return err
		}
		for _, arch := range []string{"llama", "qwen2"} {
			path, err := foundry.EnsurePreset(dir, arch, "tiny", foundry.F32, nil)
			if err != nil {
				return err
			}
			paths = append(paths, path)
		}
		path, err := foundry.EnsureRecall(dir, nil)
		if err != nil {
			return err
		}
		paths = append(paths, path)
	}
	rows, err := parity.Run(ctx, parity.Config{Models: paths, Device: dev.device, GPULayers: dev.gpuLayers, Threads: *threads, Tolerance: *tol,
		Log: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }})
	fmt.Printf("\nbench %s\n\n", strings.Join(append([]string{"parity"}, args...), " "))
	fmt.Print(parity.Table(rows))
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(rows, "", "  ")
		if werr := os.WriteFile(*jsonOut, b, 0o644); werr != nil && err == nil {
			err = werr
		}
	}
	if err != nil {
		return err
	}
	for _, r := range rows {
		if !r.OK {
			return fmt.Errorf("parity: %s %s on %s differs from the CPU", r.Model, r.Check, r.Device)
		}
	}
	return nil
}
