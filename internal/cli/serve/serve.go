// Package serve is `kvrecall serve`, kvrecall's local long-context endpoint: OpenAI- and
// Ollama-compatible routes, documents ingested once and answered under a
// bounded KV budget, /health and Prometheus /metrics.
//
//	kvrecall serve --model FILE        (make serve builds with SIMD flags)
//
// With no --model it serves the foundry's recall model, built if absent.
// Every flag has an environment variable (KVRECALL_<FLAG>, dashes as
// underscores). It binds 127.0.0.1 unless told otherwise; set --api-key
// before exposing it.
package serve

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/server"
	"github.com/kvrecall/kvrecall/squeezed"
	"github.com/kvrecall/kvrecall/store"
)

// envName is the variable of a flag: --kv-budget -> KVRECALL_KV_BUDGET.
func envName(flagName string) string {
	return "KVRECALL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

type settings struct {
	model, host, data, apiKey, policy string
	device                            string
	gpuLayers                         int
	store                             string
	headsProfile, headsProfiles       string
	port, threads, ctxLen, budget     int
	maxConcurrent, queue, maxTokens   int
	pageSize                          int
	maxDocMemory                      int64
	squeezed                          bool
	maxBody                           int64
	shutdown, drain                   time.Duration
	readTimeout, idleTimeout          time.Duration
	writeTimeout                      time.Duration
	verbose                           bool
}

func parse(args []string) (*settings, error) {
	s := &settings{}
	fs := flag.NewFlagSet("kvrecall serve", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: kvrecall serve [flags]

Serves a GGUF model over HTTP: OpenAI-compatible /v1/completions,
/v1/chat/completions and /v1/models, Ollama-compatible /api/generate,
/api/chat, /api/tags and /api/show, documents at /v1/documents (ingested
once, answered under a bounded KV budget), /health and /metrics.
Every flag can also be set as KVRECALL_<FLAG> (dashes as underscores).

`)
		fs.PrintDefaults()
	}
	fs.StringVar(&s.model, "model", "", "GGUF model (default: the foundry's recall model, built if absent)")
	fs.StringVar(&s.host, "host", "127.0.0.1", "address to bind; anything but loopback should have --api-key")
	fs.IntVar(&s.port, "port", 8080, "port")
	fs.IntVar(&s.threads, "threads", 0, "CPU threads (0: all)")
	fs.StringVar(&s.device, "device", "cpu", "where the model's layers run: cpu, gpu (the first GPU) or a device name from `kvrecall devices` (GPUs need a backend library: make cuda, docs/gpu.md)")
	fs.IntVar(&s.gpuLayers, "gpu-layers", 0, "layers to offload to a GPU --device, counted as llama.cpp's -ngl (the last N; 0: all)")
	fs.IntVar(&s.ctxLen, "ctx", 32768, "context length: most tokens in a session (document + question + answer)")
	fs.StringVar(&s.policy, "kv-policy", "retro", "default paging method for document requests: "+paging.Known())
	fs.StringVar(&s.headsProfile, "heads-profile", "", "head profile for +heads methods (retro+heads: retrieval KV heads attend to retro's pages, streaming heads to sinks + window): \"half\" for a synthetic one; default: the retrieval heads the model records")
	fs.StringVar(&s.headsProfiles, "heads-profiles", "", "directory of head profiles (NAME.heads.json, from `heads detect`) that requests may name in heads_profile; each is checked against the model at start")
	fs.IntVar(&s.budget, "kv-budget", paging.DefaultBudget, "default KV budget in tokens for document requests")
	fs.IntVar(&s.pageSize, "page-size", runtime.DefaultPageSize, "tokens per KV page (16..256)")
	fs.BoolVar(&s.squeezed, "squeezed", false, "cluster each ingested document's keys (k-means, 5% of its tokens) so that requests can use the squeezed method")
	fs.StringVar(&s.data, "data", "", "directory for documents (default: the user cache directory)")
	fs.StringVar(&s.store, "store", "", "shared document store, redis://[user:password@]host:port[/db] (or rediss://, file:///path): documents ingested by any instance are answered by all without prefill; --data stays the local tier (see docs/store.md)")
	fs.Int64Var(&s.maxDocMemory, "max-document-memory", 0, "host memory in bytes for opened documents; least recently used ones beyond it reload from disk when next used (0: 4 GiB, negative: no bound)")
	fs.StringVar(&s.apiKey, "api-key", "", "require this key (Authorization: Bearer KEY or x-api-key)")
	fs.IntVar(&s.maxConcurrent, "max-concurrent", 1, "requests generating at once (the backend computes one graph at a time; more interleaves requests at some throughput cost)")
	fs.IntVar(&s.queue, "queue", server.DefaultQueueLength, "requests waiting for a slot; more get 429 (0: none wait)")
	fs.Int64Var(&s.maxBody, "max-body", 32<<20, "request body limit in bytes")
	fs.IntVar(&s.maxTokens, "max-tokens", 512, "default answer length when a request sets none")
	fs.DurationVar(&s.shutdown, "shutdown-grace", 30*time.Second, "on SIGTERM, how long in-flight requests may finish before they are cancelled")
	fs.DurationVar(&s.readTimeout, "read-timeout", server.DefaultReadTimeout, "longest time to receive a request's headers and body (0: no limit)")
	fs.DurationVar(&s.idleTimeout, "idle-timeout", server.DefaultIdleTimeout, "keep-alive connections with no request for this long are closed (0: no limit)")
	fs.DurationVar(&s.writeTimeout, "write-timeout", server.DefaultWriteTimeout, "longest a write to a client may block, renewed per streamed chunk; a client that stops reading for longer has its generation cancelled (0: no limit)")
	fs.BoolVar(&s.verbose, "verbose", false, "log engine and request details")
	// Environment first, flags override.
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if err := f.Value.Set(v); err != nil && envErr == nil {
				envErr = fmt.Errorf("%s=%q: %v", envName(f.Name), v, err)
			}
		}
	})
	if envErr != nil {
		return nil, envErr
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if s.port < 0 || s.port > 65535 {
		return nil, fmt.Errorf("port %d out of range", s.port)
	}
	if s.queue < 0 {
		return nil, fmt.Errorf("--queue %d is negative", s.queue)
	}
	if s.store != "" {
		// The URL's form only (store.Open contacts nothing); a bad one is
		// an error naming the flag before anything starts.
		sh, err := store.Open(s.store)
		if err != nil {
			return nil, fmt.Errorf("--store: %v", err)
		}
		sh.Close()
	}
	for name, d := range map[string]time.Duration{"shutdown-grace": s.shutdown, "read-timeout": s.readTimeout, "idle-timeout": s.idleTimeout, "write-timeout": s.writeTimeout} {
		if d < 0 {
			return nil, fmt.Errorf("--%s %v is negative", name, d)
		}
	}
	return s, nil
}

// drainTimeout bounds the wait for cancelled requests after the grace
// period: each stops at its next prefill batch or token, well within it.
const drainTimeout = 10 * time.Second

// orNone maps a flag's 0 ("none") to the server's negative "none" (its 0
// picks a default).
func orNone[T int | time.Duration](v T) T {
	if v == 0 {
		return -1
	}
	return v
}

// Run runs `kvrecall serve args...` until SIGINT or SIGTERM, which shut
// it down gracefully. -h gives flag.ErrHelp.
func Run(args []string) error {
	st, err := parse(args)
	if err != nil {
		return err
	}
	level := slog.LevelInfo
	if !st.verbose {
		level = slog.LevelError // ggml and llama.cpp log every load at info
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	ip := net.ParseIP(st.host)
	if st.apiKey == "" && (ip == nil || !ip.IsLoopback()) && st.host != "localhost" {
		logger.Warn("listening beyond loopback without an API key: anyone who can reach it can use it (set --api-key)", "host", st.host)
	}
	var shared *store.Store
	if st.store != "" {
		if shared, err = store.Open(st.store); err != nil {
			return fmt.Errorf("--store: %v", err)
		}
		defer shared.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if err := shared.Ping(ctx); err != nil {
			// Not fatal: the instance serves its local tier, /health says
			// so, and the client reconnects when the store is back.
			logger.Warn("shared store unreachable at start: serving documents from the local tier only (see /health)", "store", shared.String(), "err", err)
		}
		cancel()
	}
	srv := server.New(server.Config{
		APIKey: st.apiKey, MaxConcurrent: st.maxConcurrent, QueueLength: orNone(st.queue), MaxBodyBytes: st.maxBody,
		MaxTokens: st.maxTokens, Policy: runtime.PolicyOptions{Policy: st.policy, Budget: st.budget}, Logger: logger,
		ReadTimeout: orNone(st.readTimeout), IdleTimeout: orNone(st.idleTimeout), WriteTimeout: orNone(st.writeTimeout),
	})
	if _, err := paging.New(st.policy, paging.Config{PageSize: st.pageSize, Budget: st.budget}); err != nil {
		return err
	}

	// Cancelled with server.ErrShutdown when the grace period is over, so
	// that handlers tell their clients why their stream ends.
	baseCtx, cancelAll := context.WithCancelCause(context.Background())
	defer cancelAll(nil)
	hs := srv.HTTPServer(net.JoinHostPort(st.host, strconv.Itoa(st.port)), baseCtx)
	ln, err := net.Listen("tcp", hs.Addr)
	if err != nil {
		return err
	}
	logger.Info("listening (GET /health answers 503 until the model is loaded)", "addr", "http://"+ln.Addr().String())
	serveErr := make(chan error, 1)
	go func() { serveErr <- hs.Serve(ln) }()

	loaded := make(chan *runtime.Model, 1)
	loadErr := make(chan error, 1)
	go func() {
		t0 := time.Now()
		path := st.model
		if path == "" {
			dir, err := foundry.ModelsDir()
			if err != nil {
				loadErr <- err
				return
			}
			path, err = foundry.EnsureRecall(dir, func(p string) { logger.Info("building the recall model (once)", "path", p) })
			if err != nil {
				loadErr <- err
				return
			}
		}
		opts := st.modelOptions()
		opts.Store = shared
		m, err := runtime.Open(baseCtx, path, opts)
		if err != nil {
			loadErr <- err
			return
		}
		if err := runtime.ApplyHeadProfile(m, st.headsProfile); err != nil {
			m.Close()
			loadErr <- err
			return
		}
		if st.headsProfiles != "" {
			profs, err := loadHeadProfiles(st.headsProfiles, m)
			if err != nil {
				m.Close()
				loadErr <- err
				return
			}
			srv.SetHeadProfiles(profs)
		}
		if err := srv.SetModel(m, time.Since(t0)); err != nil {
			m.Close()
			loadErr <- err
			return
		}
		logger.Info("model ready", "path", path, "arch", m.Config().Arch, "context", m.Options().ContextLength, "load", time.Since(t0).Round(time.Millisecond))
		loaded <- m
	}()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	var m *runtime.Model
	for {
		select {
		case m = <-loaded:
			continue
		case err := <-loadErr:
			hs.Close()
			return err
		case err := <-serveErr:
			if !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		case s := <-sig:
			logger.Info("shutting down: finishing in-flight requests", "signal", s.String(), "grace", st.shutdown)
			ctx, cancel := context.WithTimeout(context.Background(), st.shutdown)
			err := hs.Shutdown(ctx)
			cancel()
			if err != nil {
				// Cancel what still runs and let each handler reach its
				// next cancellation point (a prefill batch or a token) and
				// tell its client, before the connections are closed.
				logger.Warn("grace period over: cancelling the remaining requests")
				cancelAll(server.ErrShutdown)
				ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
				if err := srv.Drain(ctx); err != nil {
					logger.Warn("requests did not stop in time", "err", err)
				}
				cancel()
				hs.Close()
			}
			// Close waits for any forward pass still in flight and refuses
			// later ones: the backend is never freed under a running pass.
			if m != nil {
				m.Close()
			}
			return nil
		}
	}
}

// loadHeadProfiles reads every NAME.heads.json in dir as a head profile of
// m; a profile made for another model is an error naming its file.
func loadHeadProfiles(dir string, m *runtime.Model) (map[string]heads.Classes, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.heads.json"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("--heads-profiles %s: no *.heads.json files", dir)
	}
	out := map[string]heads.Classes{}
	for _, p := range paths {
		prof, err := heads.Load(p, m)
		if err != nil {
			return nil, err
		}
		out[strings.TrimSuffix(filepath.Base(p), ".heads.json")] = prof
	}
	return out, nil
}

// modelOptions are the runtime options the flags ask for.
func (st *settings) modelOptions() runtime.Options {
	return runtime.Options{Threads: st.threads, ContextLength: st.ctxLen, DataDir: st.data, PageSize: st.pageSize,
		MaxDocumentBytes: st.maxDocMemory, Squeezed: squeezedOptions(st.squeezed), Device: st.device, GPULayers: st.gpuLayers}
}

// squeezedOptions turns --squeezed into the runtime's clustering options
// (the paper's defaults), nil when off.
func squeezedOptions(on bool) *squeezed.Options {
	if !on {
		return nil
	}
	return &squeezed.Options{}
}
