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
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvrecall/kvrecall/heads"
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
	// QueueLength 0 means the default; a negative value means no queue (a
	// request that finds every slot taken gets 429 at once).

	// Timeouts of the connection (see HTTPServer); zero picks the default,
	// a negative value disables one. ReadTimeout bounds reading the headers
	// and body of a request (a client trickling its body cannot hold a
	// connection); it does not bound the response. IdleTimeout closes
	// keep-alive connections with no request. WriteTimeout bounds each
	// write to the client, renewed per chunk: a streaming client that stops
	// reading gets its generation cancelled (and its slot freed) once a
	// write has blocked that long.
	ReadHeaderTimeout, ReadTimeout, IdleTimeout, WriteTimeout time.Duration
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
		c.QueueLength = DefaultQueueLength
	}
	for _, t := range []struct {
		d   *time.Duration
		def time.Duration
	}{{&c.ReadHeaderTimeout, 10 * time.Second}, {&c.ReadTimeout, DefaultReadTimeout}, {&c.IdleTimeout, DefaultIdleTimeout}, {&c.WriteTimeout, DefaultWriteTimeout}} {
		if *t.d == 0 {
			*t.d = t.def
		} else if *t.d < 0 {
			*t.d = 0 // none
		}
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

// Defaults of Config.
const (
	DefaultQueueLength  = 16
	DefaultReadTimeout  = time.Minute
	DefaultIdleTimeout  = 2 * time.Minute
	DefaultWriteTimeout = 30 * time.Second
)

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

	active atomic.Int64 // requests being handled (see Drain)

	profilesMu sync.RWMutex
	profiles   map[string]heads.Classes // head profiles requests may name
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

// HTTPServer returns an http.Server for s on addr with the configured
// timeouts. Requests' contexts derive from base: cancelling it with cause
// ErrShutdown (context.WithCancelCause) cancels generations in flight and
// tells their clients why.
func (s *Server) HTTPServer(addr string, base context.Context) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           s,
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		IdleTimeout:       s.cfg.IdleTimeout,
		BaseContext:       func(net.Listener) context.Context { return base },
	}
}

// Drain waits until no request is being handled, or ctx ends. After
// http.Server.Shutdown gave up and the base context was cancelled, handlers
// still run until their generation reaches a cancellation point;
// http.Server.Close does not wait for them.
func (s *Server) Drain(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for s.active.Load() > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d requests still running: %w", s.active.Load(), ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// ServeHTTP authenticates, limits the body and dispatches.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.active.Add(1)
	defer s.active.Add(-1)
	if s.cfg.WriteTimeout > 0 {
		dw := &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), timeout: s.cfg.WriteTimeout}
		// A deadline left by the previous request on this connection must
		// not cut this one: net/http resets none without its own WriteTimeout.
		dw.rc.SetWriteDeadline(time.Time{})
		w = dw
	}
	// net/http keeps ReadTimeout's deadline on the connection after the
	// body is read, and its background read then cancels the request's
	// context when the deadline passes: lift it once the body is in, so that
	// a long generation is not cut.
	rc := http.NewResponseController(w)
	if r.ContentLength == 0 {
		rc.SetReadDeadline(time.Time{})
	} else {
		r.Body = &liftAtEOF{ReadCloser: r.Body, rc: rc}
	}
	defer func() {
		if v := recover(); v != nil {
			s.cfg.Logger.Error("panic serving request", "path", r.URL.Path, "panic", v, "stack", string(debug.Stack()))
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

// deadlineWriter renews the connection's write deadline before every write
// and flush, so that one blocked write (a client that stopped reading) fails
// after the timeout instead of holding the handler, and its generation
// slot, forever.
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
}

func (w *deadlineWriter) Write(b []byte) (int, error) {
	w.rc.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.ResponseWriter.Write(b)
}

func (w *deadlineWriter) FlushError() error {
	w.rc.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.rc.Flush()
}

func (w *deadlineWriter) Flush() { w.FlushError() }

func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// liftAtEOF clears the connection's read deadline once the body is read.
type liftAtEOF struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *liftAtEOF) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// authorized compares the key in constant time. The scheme is
// case-insensitive ("bearer" is as good as "Bearer", RFC 9110 11.1).
func (s *Server) authorized(r *http.Request) bool {
	if s.cfg.APIKey == "" {
		return true
	}
	key := r.Header.Get("x-api-key")
	if scheme, token, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " "); ok && strings.EqualFold(scheme, "Bearer") {
		key = strings.TrimSpace(token)
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
		if allow := s.allowed(r); len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			writeError(w, r, http.StatusMethodNotAllowed, fmt.Sprintf("method %s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, strings.Join(allow, ", ")))
			return
		}
		writeError(w, r, http.StatusNotFound, fmt.Sprintf("no route %s %s", r.Method, r.URL.Path))
	})
}

// allowed lists the methods that have a route for r's path (the catch-all
// "/" matches every method, so the mux never answers 405 by itself).
func (s *Server) allowed(r *http.Request) []string {
	var out []string
	for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		probe := r.Clone(r.Context())
		probe.Method = method
		if _, pattern := s.mux.Handler(probe); pattern != "/" && pattern != "" {
			out = append(out, method)
		}
	}
	return out
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
	out := map[string]any{"status": "ok"}
	// A shared store that cannot be reached does not make the instance
	// unhealthy (it serves from its local tier), but it is said here.
	if st := s.model.Load().StoreStatus(r.Context()); st != nil {
		out["store"] = st
	}
	writeJSON(w, http.StatusOK, out)
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

// admit acquires a slot. A refusal is an error to answer: a 429 (with
// Retry-After set) when the queue is full, the context's error when the
// client went away or the server shut down while the request was queued.
func (s *Server) admit(w http.ResponseWriter, r *http.Request) (release func(), err error) {
	release, err = s.acquire(r.Context())
	if errors.Is(err, errBusy) {
		w.Header().Set("Retry-After", "1")
		return nil, &httpError{status: http.StatusTooManyRequests,
			msg: fmt.Sprintf("server busy: %d requests running and %d queued; retry later", s.cfg.MaxConcurrent, s.cfg.QueueLength)}
	}
	return release, err
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
	writeJSON(w, status, map[string]any{"error": map[string]any{"message": msg, "type": errorType(status), "code": strconv.Itoa(status)}})
}

// errorType is OpenAI's error type of a status.
func errorType(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return "authentication_error"
	case status == http.StatusTooManyRequests:
		return "rate_limit_error"
	case status == http.StatusServiceUnavailable:
		return "unavailable_error"
	case status == http.StatusNotFound:
		return "not_found_error"
	case status >= 500:
		return "server_error"
	}
	return "invalid_request_error"
}

// decodeJSON reads a JSON body; it reports malformed, oversized or too
// slowly sent bodies with the right status. It reads the body to its end so
// that net/http starts watching the connection for a disconnect.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(v)
	if err == nil {
		_, err = io.Copy(io.Discard, r.Body)
	}
	if err != nil {
		bodyError(w, r, err, "malformed JSON: ")
		return false
	}
	return true
}

// bodyError answers a failure to read the request body.
func bodyError(w http.ResponseWriter, r *http.Request, err error, prefix string) {
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, r, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds the limit of %d bytes", tooBig.Limit))
	case errors.Is(err, os.ErrDeadlineExceeded):
		w.Header().Set("Connection", "close")
		writeError(w, r, http.StatusRequestTimeout, "the request body did not arrive within the read timeout")
	default:
		writeError(w, r, http.StatusBadRequest, prefix+err.Error())
	}
}

// absPath matches absolute file paths in error messages.
var absPath = regexp.MustCompile(`(?:/[^\s/"':]+)+/([^\s/"':]+)`)

// redact keeps only the base name of file paths in messages that go to
// clients: where the server keeps its files is not theirs to know.
func redact(msg string) string {
	return absPath.ReplaceAllString(msg, "$1")
}
