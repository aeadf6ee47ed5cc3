// Package server is kvrecall's HTTP endpoint: OpenAI- and Ollama-compatible
// completion and chat routes, documents that are ingested once and answered
// under a paging policy, health and Prometheus metrics. It uses the standard
// library's router (Go 1.22 patterns).
package server

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvrecall/kvrecall/runtime"
)

// Version is reported by /api/version.
const Version = "0.1.0"

// Config holds the server's settings. Zero values pick the defaults.
type Config struct {
	ModelName     string // name clients use (default: the model file's base name)
	APIKey        string // when set, every route but /health needs it (Authorization: Bearer, or x-api-key)
	MaxConcurrent int    // generations and ingests running at once (default 1)
	QueueLength   int    // requests waiting for a slot; beyond it 429 (default 16)
	MaxBodyBytes  int64  // request body limit (default 32 MiB)
	MaxTokens     int    // default max tokens of an answer (default 512)
	// Policy is the default paging policy for requests that name a document.
	Policy runtime.PolicyOptions
	Logger *slog.Logger
}

func (c *Config) fill() {
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = 1
	}
	if c.QueueLength < 0 {
		c.QueueLength = 0
	} else if c.QueueLength == 0 {
		c.QueueLength = 16
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 32 << 20
	}
	if c.MaxTokens <= 0 {
		c.MaxTokens = 512
	}
	if c.Policy.Policy == "" {
		c.Policy.Policy = "retro"
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Server serves one model. Create it with New, hand it the model with
// SetModel once loaded (/health answers 503 until then).
type Server struct {
	cfg     Config
	mux     *http.ServeMux
	model   atomic.Pointer[runtime.Model]
	metrics *metrics
	chat    *chatTemplate
	loaded  time.Time
	loadDur time.Duration

	slots   chan struct{}
	queued  atomic.Int64
	started time.Time

	ingestMu sync.Mutex // one ingest writes a given document at a time
}

// New returns a server with no model yet.
func New(cfg Config) *Server {
	cfg.fill()
	s := &Server{cfg: cfg, mux: http.NewServeMux(), metrics: newMetrics(), slots: make(chan struct{}, cfg.MaxConcurrent), started: time.Now()}
	s.routes()
	return s
}

// SetModel makes the server ready to answer with m.
func (s *Server) SetModel(m *runtime.Model, loadTime time.Duration) error {
	if s.cfg.ModelName == "" {
		s.cfg.ModelName = strings.TrimSuffix(filepath.Base(m.Path()), filepath.Ext(m.Path()))
	}
	tpl, err := newChatTemplate(m)
	if err != nil {
		return err
	}
	s.chat = tpl
	s.loaded, s.loadDur = time.Now(), loadTime
	s.metrics.attach(m)
	s.model.Store(m)
	return nil
}

// Metrics returns the Prometheus registry's handler (also at /metrics).
func (s *Server) Handler() http.Handler { return s }

// ServeHTTP authenticates, limits the body and dispatches.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		if v := recover(); v != nil {
			s.cfg.Logger.Error("panic serving request", "path", r.URL.Path, "panic", v)
			writeError(w, r, http.StatusInternalServerError, "internal error")
		}
	}()
	if r.URL.Path != "/health" && !s.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="kvrecall"`)
		writeError(w, r, http.StatusUnauthorized, "invalid or missing API key")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
	s.mux.ServeHTTP(w, r)
}

// authorized compares the key in constant time.
func (s *Server) authorized(r *http.Request) bool {
	if s.cfg.APIKey == "" {
		return true
	}
	key := r.Header.Get("x-api-key")
	if auth := r.Header.Get("Authorization"); strings.HasPrefix(auth, "Bearer ") {
		key = strings.TrimPrefix(auth, "Bearer ")
	}
	return subtle.ConstantTimeCompare([]byte(key), []byte(s.cfg.APIKey)) == 1
}

func (s *Server) routes() {
	s.mux.HandleFunc("GET /health", s.health)
	s.mux.Handle("GET /metrics", s.metrics.handler())

	s.mux.HandleFunc("GET /v1/models", s.ready(s.openaiModels))
	s.mux.HandleFunc("POST /v1/completions", s.ready(s.openaiCompletions))
	s.mux.HandleFunc("POST /v1/chat/completions", s.ready(s.openaiChat))

	s.mux.HandleFunc("POST /api/generate", s.ready(s.ollamaGenerate))
	s.mux.HandleFunc("POST /api/chat", s.ready(s.ollamaChat))
	s.mux.HandleFunc("GET /api/tags", s.ready(s.ollamaTags))
	s.mux.HandleFunc("POST /api/show", s.ready(s.ollamaShow))
	s.mux.HandleFunc("GET /api/version", s.ollamaVersion)

	s.mux.HandleFunc("POST /v1/documents", s.ready(s.ingest))
	s.mux.HandleFunc("GET /v1/documents", s.ready(s.listDocuments))
	s.mux.HandleFunc("GET /v1/documents/{id}", s.ready(s.getDocument))
	s.mux.HandleFunc("DELETE /v1/documents/{id}", s.ready(s.deleteDocument))
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, http.StatusNotFound, fmt.Sprintf("no route %s %s", r.Method, r.URL.Path))
	})
}

// ready answers 503 while the model loads.
func (s *Server) ready(h func(http.ResponseWriter, *http.Request, *runtime.Model)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		m := s.model.Load()
		if m == nil {
			w.Header().Set("Retry-After", "5")
			writeError(w, r, http.StatusServiceUnavailable, "Loading model")
			return
		}
		h(w, r, m)
	}
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	if s.model.Load() == nil {
		w.Header().Set("Retry-After", "5")
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": map[string]any{"code": 503, "message": "Loading model", "type": "unavailable_error"}})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// errBusy is returned by acquire when the queue is full.
var errBusy = errors.New("server busy")

// acquire waits for a generation slot, queueing up to QueueLength requests.
// The release function must be called when the work is done.
func (s *Server) acquire(ctx context.Context) (func(), error) {
	select {
	case s.slots <- struct{}{}:
	default:
		if s.queued.Add(1) > int64(s.cfg.QueueLength) {
			s.queued.Add(-1)
			return nil, errBusy
		}
		s.metrics.queued.Inc()
		select {
		case s.slots <- struct{}{}:
			s.queued.Add(-1)
			s.metrics.queued.Dec()
		case <-ctx.Done():
			s.queued.Add(-1)
			s.metrics.queued.Dec()
			return nil, ctx.Err()
		}
	}
	s.metrics.inFlight.Inc()
	return func() {
		s.metrics.inFlight.Dec()
		<-s.slots
	}, nil
}

// admit acquires a slot or writes the refusal; ok is false when refused.
func (s *Server) admit(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	release, err := s.acquire(r.Context())
	switch {
	case errors.Is(err, errBusy):
		w.Header().Set("Retry-After", "1")
		writeError(w, r, http.StatusTooManyRequests, fmt.Sprintf("server busy: %d requests running and %d queued; retry later", s.cfg.MaxConcurrent, s.cfg.QueueLength))
		return nil, false
	case err != nil:
		writeError(w, r, 499, "client went away while queued")
		return nil, false
	}
	return release, true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// writeError answers in the shape of the API the route belongs to: OpenAI's
// {"error": {"message", "type", "code"}} for /v1, Ollama's {"error": "..."}
// for /api.
func writeError(w http.ResponseWriter, r *http.Request, status int, msg string) {
	if strings.HasPrefix(r.URL.Path, "/api/") {
		writeJSON(w, status, map[string]string{"error": msg})
		return
	}
	typ := "invalid_request_error"
	switch {
	case status == http.StatusUnauthorized:
		typ = "authentication_error"
	case status == http.StatusTooManyRequests:
		typ = "rate_limit_error"
	case status == http.StatusServiceUnavailable:
		typ = "unavailable_error"
	case status == http.StatusNotFound:
		typ = "not_found_error"
	case status >= 500:
		typ = "server_error"
	}
	writeJSON(w, status, map[string]any{"error": map[string]any{"message": msg, "type": typ, "code": strconv.Itoa(status)}})
}

// decodeJSON reads a JSON body; it reports malformed or oversized bodies
// with the right status.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			writeError(w, r, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", tooBig.Limit))
		default:
			writeError(w, r, http.StatusBadRequest, "malformed JSON: "+err.Error())
		}
		return false
	}
	return true
}
