package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"

	"github.com/kvrecall/kvrecall/internal/chat"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// ErrShutdown is the cause with which the base context of HTTPServer is
// cancelled when shutdown's grace period is over: generations in flight
// stop, and their clients get an error (a 503, an SSE error event or an
// NDJSON error line) rather than a stream that looks complete.
var ErrShutdown = errors.New("the server is shutting down")

// errWriteTimeout marks a write to the client that blocked longer than
// Config.WriteTimeout.
var errWriteTimeout = errors.New("write to the client timed out")

// errClientGone marks any other failed write: the client disconnected.
var errClientGone = errors.New("client went away")

// writeFailure classifies the error of a write to the client.
func writeFailure(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: %v", errWriteTimeout, err)
	}
	return fmt.Errorf("%w: %v", errClientGone, err)
}

// genRequest is a generation in terms of the runtime, whichever API asked.
type genRequest struct {
	route    string
	prompt   string // templated text
	addBOS   bool   // tokenize the prompt with BOS (not after a document)
	document string // answer after this document's pages
	policy   runtime.PolicyOptions
	opts     runtime.GenerateOptions
	numCtx   int         // Ollama's num_ctx: the session's context (0: the model's)
	grammar  string      // GBNF the answer is sampled under ("": free text)
	tools    []chat.Tool // the tools offered (chat): calls are parsed from the answer
	forced   bool        // tool_choice forced a call: an answer without one is an error

	// Filled by prepare.
	tokens   []int32
	capacity int
}

// httpError carries the status a failure should be answered with.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &httpError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

// statusOf maps a generation error to an HTTP status. Messages of errors
// from the runtime are redacted (no file paths).
func statusOf(err error) (int, string) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		return he.status, he.msg
	case errors.Is(err, runtime.ErrNoDocument):
		return http.StatusNotFound, redact(err.Error())
	case errors.Is(err, runtime.ErrContextFull):
		return http.StatusBadRequest, redact(err.Error())
	case errors.Is(err, kvcache.ErrCorrupt):
		return http.StatusInternalServerError, redact(err.Error())
	case errors.Is(err, errClientGone), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return 499, "request cancelled"
	case errors.Is(err, errWriteTimeout):
		return http.StatusGatewayTimeout, "a write to the client blocked for longer than the write timeout"
	case errors.Is(err, runtime.ErrClosed):
		return http.StatusServiceUnavailable, ErrShutdown.Error()
	case errors.Is(err, runtime.ErrStoreUnavailable):
		return http.StatusServiceUnavailable, redact(err.Error())
	}
	return http.StatusInternalServerError, redact(err.Error())
}

// failure is how a request that failed with err is answered: silent when
// nobody can read the answer (the client went away, or stopped reading).
// A cancellation by the server's shutdown is a 503 the client must see.
func (s *Server) failure(r *http.Request, err error) (status int, msg string, silent bool) {
	status, msg = statusOf(err)
	if status == 499 && errors.Is(context.Cause(r.Context()), ErrShutdown) {
		return http.StatusServiceUnavailable, ErrShutdown.Error() + ": the request was cancelled before it finished", false
	}
	return status, msg, status == 499 || errors.Is(err, errWriteTimeout)
}

// outcomeOf names a request's end for kvrecall_requests_total.
func outcomeOf(err error, r *http.Request) string {
	if err == nil {
		return outcomeOK
	}
	status, _ := statusOf(err)
	switch {
	case status == http.StatusTooManyRequests:
		return outcomeBusy
	case errors.Is(context.Cause(r.Context()), ErrShutdown), errors.Is(err, runtime.ErrClosed):
		return outcomeShutdown
	case errors.Is(err, errWriteTimeout):
		return outcomeWriteTimeout
	case status == 499:
		return outcomeCancelled
	case status < 500:
		return outcomeInvalid
	}
	return outcomeError
}

// prepare checks req against the model before it takes a slot and before
// anything is written, so that every client error gets its real status:
// num_ctx, the document (its metadata only), the policy and the prompt's
// length. The prompt is tokenized here, outside the slot, and only as far
// as the context allows (an over-long prompt costs no more than a full one).
func (s *Server) prepare(m *runtime.Model, req *genRequest) error {
	capacity := m.Options().ContextLength
	if req.numCtx > 0 {
		if req.numCtx > capacity {
			return badRequest("num_ctx %d exceeds the server's context length of %d (start the server with a larger --ctx)", req.numCtx, capacity)
		}
		capacity = req.numCtx
	}
	req.capacity = capacity
	if req.prompt == "" && req.document == "" {
		// Without a document there is nothing to continue. (After one, an
		// empty prompt continues the document.)
		return badRequest("the prompt is empty")
	}
	taken := 0
	if req.document != "" {
		in, err := m.DocumentInfo(req.document)
		if err != nil {
			return err
		}
		if _, err := m.NewSelector(req.policy); err != nil {
			return badRequest("policy: %v", err)
		}
		if in.Tokens >= capacity {
			return badRequest("document %s has %d tokens but the context holds %d: raise the context length", in.ID, in.Tokens, capacity)
		}
		taken = in.Tokens
	}
	// The prompt and at least one answer token must fit.
	limit := capacity - taken - 1
	toks, err := m.Tokenizer().EncodeLimit(req.prompt, req.addBOS, limit)
	var tooMany *runtime.TooManyTokensError
	switch {
	case errors.As(err, &tooMany):
		return badRequest("the prompt needs at least %d tokens but the context holds %d (%d of them taken by the document): nothing was truncated; shorten the prompt or raise the context length",
			tooMany.AtLeast+taken+1, capacity, taken)
	case err != nil:
		return badRequest("tokenize: %v", err)
	case len(toks) == 0 && req.document == "":
		return badRequest("the prompt is empty")
	}
	req.tokens = toks
	return nil
}

// generate runs a prepared request in its slot. onStart is called once the
// session is ready, just before the first token is computed (streams send
// their first bytes there); onToken streams text. Both are called from the
// request's goroutine. The result is nil only if nothing ran.
func (s *Server) generate(ctx context.Context, m *runtime.Model, req genRequest, onStart func() error, onToken func(runtime.Token) error) (*runtime.Result, error) {
	var sess *runtime.Session
	var err error
	if req.document != "" {
		doc, err := m.OpenDocument(req.document)
		if err != nil {
			return nil, err
		}
		if sess, err = m.DocumentSessionContext(ctx, doc, req.policy); err != nil {
			if errors.Is(err, runtime.ErrContextFull) || errors.Is(err, runtime.ErrClosed) {
				return nil, err
			}
			return nil, badRequest("%v", err)
		}
	} else if sess, err = m.NewSession(); err != nil {
		return nil, err
	}
	defer sess.Close()
	used := sess.Len() + len(req.tokens)
	if used >= req.capacity { // the document changed since prepare
		return nil, badRequest("the prompt needs %d tokens but the context holds %d: nothing was truncated; shorten the prompt or raise the context length", used, req.capacity)
	}
	opts := req.opts
	if opts.MaxTokens <= 0 {
		opts.MaxTokens = s.cfg.MaxTokens
	}
	opts.MaxTokens = min(opts.MaxTokens, req.capacity-used)
	if opts.Sampling.RepeatLastN < 0 { // Ollama's -1: the whole context
		opts.Sampling.RepeatLastN = req.capacity
	}
	opts.OnToken = onToken
	opts.Grammar = req.grammar
	if onStart != nil {
		if err := onStart(); err != nil {
			return nil, err
		}
	}
	res, err := sess.Generate(ctx, req.tokens, opts)
	var resident int64
	if pc, ok := sess.Cache().(*kvcache.Paged); ok {
		resident = pc.Stats().ResidentBytes
	}
	s.metrics.record(res, resident)
	return res, err
}

// finishReason maps a stop reason to OpenAI's finish_reason.
func finishReason(r runtime.StopReason) string {
	switch r {
	case runtime.StopLength, runtime.StopContext:
		return "length"
	}
	return "stop"
}
