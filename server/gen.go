package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// genRequest is a generation in terms of the runtime, whichever API asked.
type genRequest struct {
	route    string
	prompt   string // templated text
	addBOS   bool   // tokenize the prompt with BOS (not after a document)
	document string // answer after this document's pages
	policy   runtime.PolicyOptions
	opts     runtime.GenerateOptions
	numCtx   int // Ollama's num_ctx: the session's context (0: the model's)
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

// statusOf maps a generation error to an HTTP status.
func statusOf(err error) (int, string) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		return he.status, he.msg
	case errors.Is(err, runtime.ErrNoDocument):
		return http.StatusNotFound, err.Error()
	case errors.Is(err, runtime.ErrContextFull):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, kvcache.ErrCorrupt):
		return http.StatusInternalServerError, err.Error()
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return 499, "request cancelled"
	}
	return http.StatusInternalServerError, err.Error()
}

// generate runs req. onToken streams text; it is called from the request's
// goroutine. The result is nil only if nothing ran.
func (s *Server) generate(ctx context.Context, m *runtime.Model, req genRequest, onToken func(runtime.Token) error) (*runtime.Result, error) {
	capacity := m.Options().ContextLength
	if req.numCtx > 0 {
		if req.numCtx > capacity {
			return nil, badRequest("num_ctx %d exceeds the server's context length of %d (start the server with a larger --ctx)", req.numCtx, capacity)
		}
		capacity = req.numCtx
	}
	var sess *runtime.Session
	var prompt []int32
	var err error
	if req.document != "" {
		doc, err := m.OpenDocument(req.document)
		if err != nil {
			return nil, err
		}
		if prompt, err = m.Tokenizer().Encode(req.prompt, false); err != nil {
			return nil, badRequest("tokenize: %v", err)
		}
		if sess, err = m.DocumentSession(doc, req.policy); err != nil {
			return nil, badRequest("%v", err)
		}
	} else {
		if prompt, err = m.Tokenizer().Encode(req.prompt, req.addBOS); err != nil {
			return nil, badRequest("tokenize: %v", err)
		}
		if len(prompt) == 0 {
			return nil, badRequest("the prompt is empty")
		}
		if sess, err = m.NewSession(); err != nil {
			return nil, err
		}
	}
	defer sess.Close()
	used := sess.Len() + len(prompt)
	if used >= capacity {
		return nil, badRequest("the prompt needs %d tokens but the context holds %d: nothing was truncated; shorten the prompt or raise the context length", used, capacity)
	}
	opts := req.opts
	if opts.MaxTokens <= 0 {
		opts.MaxTokens = s.cfg.MaxTokens
	}
	opts.MaxTokens = min(opts.MaxTokens, capacity-used)
	opts.OnToken = onToken
	res, err := sess.Generate(ctx, prompt, opts)
	var resident int64
	if pc, ok := sess.Cache().(*kvcache.Paged); ok {
		resident = pc.Stats().ResidentBytes
	}
	s.metrics.record(req.route, res, resident, err)
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
