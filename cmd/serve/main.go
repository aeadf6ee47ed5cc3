// Command serve is kvrecall's local long-context endpoint: OpenAI- and
// Ollama-compatible routes, documents ingested once and answered under a
// bounded KV budget, /health and Prometheus /metrics.
//
//	go run ./cmd/serve --model FILE        (make serve builds with SIMD flags)
//
// With no --model it serves the foundry's recall model, built if absent.
// Every flag has an environment variable (KVRECALL_<FLAG>, dashes as
// underscores). It binds 127.0.0.1 unless told otherwise; set --api-key
// before exposing it.
package main

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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/server"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

// envName is the variable of a flag: --kv-budget -> KVRECALL_KV_BUDGET.
func envName(flagName string) string {
	return "KVRECALL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

type settings struct {
	model, host, data, apiKey, policy string
	port, threads, ctxLen, budget     int
	maxConcurrent, queue, maxTokens   int
	pageSize                          int
	maxDocMemory                      int64
	maxBody                           int64
	shutdown                          time.Duration
	verbose                           bool
}

func parse(args []string) (*settings, error) {
	s := &settings{}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.StringVar(&s.model, "model", "", "GGUF model (default: the foundry's recall model, built if absent)")
	fs.StringVar(&s.host, "host", "127.0.0.1", "address to bind; anything but loopback should have --api-key")
	fs.IntVar(&s.port, "port", 8080, "port")
	fs.IntVar(&s.threads, "threads", 0, "CPU threads (0: all)")
	fs.IntVar(&s.ctxLen, "ctx", 32768, "context length: most tokens in a session (document + question + answer)")
	fs.StringVar(&s.policy, "kv-policy", "retro", "default paging policy for document requests: "+strings.Join(paging.Names, ", "))
	fs.IntVar(&s.budget, "kv-budget", paging.DefaultBudget, "default KV budget in tokens for document requests")
	fs.IntVar(&s.pageSize, "page-size", runtime.DefaultPageSize, "tokens per KV page (16..256)")
	fs.StringVar(&s.data, "data", "", "directory for documents (default: the user cache directory)")
	fs.Int64Var(&s.maxDocMemory, "max-document-memory", 0, "host memory in bytes for opened documents; least recently used ones beyond it reload from disk when next used (0: 4 GiB, negative: no bound)")
	fs.StringVar(&s.apiKey, "api-key", "", "require this key (Authorization: Bearer KEY or x-api-key)")
	fs.IntVar(&s.maxConcurrent, "max-concurrent", 1, "requests generating at once (the backend computes one graph at a time; more interleaves requests at some throughput cost)")
	fs.IntVar(&s.queue, "queue", 16, "requests waiting for a slot; more get 429")
	fs.Int64Var(&s.maxBody, "max-body", 32<<20, "request body limit in bytes")
	fs.IntVar(&s.maxTokens, "max-tokens", 512, "default answer length when a request sets none")
	fs.DurationVar(&s.shutdown, "shutdown-grace", 30*time.Second, "on SIGTERM, how long in-flight requests may finish before they are cancelled")
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
	return s, nil
}

func run() error {
	st, err := parse(os.Args[1:])
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
	srv := server.New(server.Config{
		APIKey: st.apiKey, MaxConcurrent: st.maxConcurrent, QueueLength: st.queue, MaxBodyBytes: st.maxBody,
		MaxTokens: st.maxTokens, Policy: runtime.PolicyOptions{Policy: st.policy, Budget: st.budget}, Logger: logger,
	})
	if _, err := paging.New(st.policy, paging.Config{PageSize: st.pageSize, Budget: st.budget}); err != nil {
		return err
	}

	baseCtx, cancelAll := context.WithCancel(context.Background())
	defer cancelAll()
	hs := &http.Server{
		Addr:              net.JoinHostPort(st.host, strconv.Itoa(st.port)),
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return baseCtx },
	}
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
		m, err := runtime.Open(baseCtx, path, runtime.Options{Threads: st.threads, ContextLength: st.ctxLen, DataDir: st.data, PageSize: st.pageSize, MaxDocumentBytes: st.maxDocMemory})
		if err != nil {
			loadErr <- err
			return
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
				logger.Warn("grace period over: cancelling the remaining requests")
				cancelAll()
				hs.Close()
			}
			if m != nil {
				m.Close()
			}
			return nil
		}
	}
}
