package server

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// stringList accepts a JSON string or an array of strings.
type stringList []string

func (s *stringList) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return errors.New("must be a string or an array of strings")
	}
	*s = many
	return nil
}

// openaiParams are the fields completions and chat share, plus kvrecall's
// extensions: document, policy, budget (and llama-server's top_k, min_p,
// repeat_penalty).
type openaiParams struct {
	Model               string     `json:"model"`
	MaxTokens           *int       `json:"max_tokens"`
	MaxCompletionTokens *int       `json:"max_completion_tokens"`
	Temperature         *float32   `json:"temperature"`
	TopP                *float32   `json:"top_p"`
	TopK                *int       `json:"top_k"`
	MinP                *float32   `json:"min_p"`
	RepeatPenalty       *float32   `json:"repeat_penalty"`
	Seed                *int       `json:"seed"`
	Stop                stringList `json:"stop"`
	N                   *int       `json:"n"`
	Stream              bool       `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Document string `json:"document"`
	Policy   string `json:"policy"`
	Budget   int    `json:"budget"`
}

// Default sampling, as Ollama's: clients that send nothing get
// temperature 0.8, top-k 40, top-p 0.9 and a random seed.
var defaultSampling = runtime.Sampling{Temperature: 0.8, TopK: 40, TopP: 0.9, Seed: -1}

func (p *openaiParams) toRuntime(s *Server) (runtime.GenerateOptions, runtime.PolicyOptions, error) {
	o := runtime.GenerateOptions{Sampling: defaultSampling, Stop: p.Stop}
	if p.N != nil && *p.N != 1 {
		return o, runtime.PolicyOptions{}, badRequest("n must be 1")
	}
	if p.MaxCompletionTokens != nil {
		p.MaxTokens = p.MaxCompletionTokens
	}
	if p.MaxTokens != nil {
		if *p.MaxTokens < 1 {
			return o, runtime.PolicyOptions{}, badRequest("max_tokens must be at least 1")
		}
		o.MaxTokens = *p.MaxTokens
	}
	if p.Temperature != nil {
		if *p.Temperature < 0 || *p.Temperature > 2 {
			return o, runtime.PolicyOptions{}, badRequest("temperature must be in [0, 2]")
		}
		o.Sampling.Temperature = *p.Temperature
	}
	if p.TopP != nil {
		if *p.TopP <= 0 || *p.TopP > 1 {
			return o, runtime.PolicyOptions{}, badRequest("top_p must be in (0, 1]")
		}
		o.Sampling.TopP = *p.TopP
	}
	if p.TopK != nil {
		o.Sampling.TopK = *p.TopK
	}
	if p.MinP != nil {
		o.Sampling.MinP = *p.MinP
	}
	if p.RepeatPenalty != nil {
		o.Sampling.RepeatPenalty = *p.RepeatPenalty
	}
	if p.Seed != nil {
		o.Sampling.Seed = *p.Seed
	}
	for _, st := range p.Stop {
		if st == "" {
			return o, runtime.PolicyOptions{}, badRequest("stop strings must not be empty")
		}
	}
	if len(p.Stop) > 16 {
		return o, runtime.PolicyOptions{}, badRequest("at most 16 stop strings")
	}
	if err := checkPolicy(p.Policy, p.Budget); err != nil {
		return o, runtime.PolicyOptions{}, err
	}
	return o, s.policy(p.Policy, p.Budget), nil
}

// checkPolicy validates a request's paging overrides.
func checkPolicy(name string, budget int) error {
	if name != "" {
		if _, _, err := paging.Parse(name); err != nil {
			return badRequest("unknown policy %q (known: %s)", name, paging.Known())
		}
	}
	if budget < 0 {
		return badRequest("budget must be positive")
	}
	return nil
}

// policy applies a request's overrides to the server's default policy.
func (s *Server) policy(name string, budget int) runtime.PolicyOptions {
	p := s.cfg.Policy
	if name != "" {
		p.Policy = name
	}
	if budget > 0 {
		p.Budget = budget
	}
	return p
}

// checkModel accepts the server's model name, with or without a tag, or none.
func (s *Server) checkModel(name string) error {
	if name == "" || name == s.cfg.ModelName || strings.TrimSuffix(name, ":latest") == s.cfg.ModelName {
		return nil
	}
	return &httpError{status: http.StatusNotFound, msg: fmt.Sprintf("model %q not found; this server serves %q", name, s.cfg.ModelName)}
}

func newID(prefix string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func (s *Server) openaiModels(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	writeJSON(w, http.StatusOK, map[string]any{
		"object": "list",
		"data": []map[string]any{{
			"id": s.cfg.ModelName, "object": "model", "created": s.loaded.Unix(), "owned_by": "kvrecall",
			"meta": map[string]any{"n_ctx": m.Options().ContextLength, "n_ctx_train": m.Config().ContextLength, "architecture": m.Config().Arch},
		}},
	})
}

type usage struct {
	PromptTokens        int            `json:"prompt_tokens"`
	CompletionTokens    int            `json:"completion_tokens"`
	TotalTokens         int            `json:"total_tokens"`
	PromptTokensDetails map[string]int `json:"prompt_tokens_details"`
}

func usageOf(res *runtime.Result) usage {
	p := res.PromptTokens + res.CachedTokens
	return usage{PromptTokens: p, CompletionTokens: res.GeneratedTokens, TotalTokens: p + res.GeneratedTokens,
		PromptTokensDetails: map[string]int{"cached_tokens": res.CachedTokens}}
}

func timingsOf(res *runtime.Result) map[string]any {
	return map[string]any{
		"prompt_n": res.PromptTokens, "prompt_ms": float64(res.PrefillDuration.Microseconds()) / 1000,
		"prompt_per_second": res.PrefillTokensPerSecond(), "cache_n": res.CachedTokens,
		"predicted_n": res.GeneratedTokens, "predicted_ms": float64(res.DecodeDuration.Microseconds()) / 1000,
		"predicted_per_second": res.DecodeTokensPerSecond(),
	}
}

// sse writes server-sent events; the headers go out with the first event.
type sse struct {
	w       http.ResponseWriter
	started bool
}

func (e *sse) send(v any) error {
	if !e.started {
		e.started = true
		h := e.w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("Connection", "keep-alive")
		h.Set("X-Accel-Buffering", "no")
		e.w.WriteHeader(http.StatusOK)
	}
	var b []byte
	if s, ok := v.(string); ok {
		b = []byte(s)
	} else {
		b, _ = json.Marshal(v)
	}
	if _, err := fmt.Fprintf(e.w, "data: %s\n\n", b); err != nil {
		return err
	}
	if f, ok := e.w.(http.Flusher); ok {
		f.Flush()
	}
	return nil
}

// fail ends a request: a JSON error if nothing was streamed yet, else an
// error event and the end of the stream.
func (e *sse) fail(r *http.Request, err error) {
	status, msg := statusOf(err)
	if status == 499 {
		return // the client is gone
	}
	if !e.started {
		writeError(e.w, r, status, msg)
		return
	}
	e.send(map[string]any{"error": map[string]any{"message": msg, "type": "server_error", "code": fmt.Sprint(status)}})
	e.send("[DONE]")
}

func (s *Server) openaiCompletions(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		openaiParams
		Prompt stringList `json:"prompt"`
	}
	if !decodeJSON(w, r, &req) {
		return
	}
	if len(req.Prompt) != 1 {
		writeError(w, r, http.StatusBadRequest, "prompt must be one string")
		return
	}
	s.openaiRun(w, r, m, &req.openaiParams, "completions", func() (genRequest, error) {
		return genRequest{prompt: req.Prompt[0], addBOS: req.Document == ""}, nil
	})
}

func (s *Server) openaiChat(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		openaiParams
		Messages []message `json:"messages"`
	}
	if !decodeJSON(w, r, &req) {
		return
	}
	s.openaiRun(w, r, m, &req.openaiParams, "chat", func() (genRequest, error) {
		prompt, err := s.chat.render(req.Messages, req.Document == "")
		if err != nil {
			return genRequest{}, badRequest("%v", err)
		}
		return genRequest{prompt: prompt, addBOS: req.Document == "" && !s.chat.startsWithBOS(prompt)}, nil
	})
}

// openaiRun validates, queues and runs a completion or chat request, and
// answers in OpenAI's format (SSE when streaming).
func (s *Server) openaiRun(w http.ResponseWriter, r *http.Request, m *runtime.Model, p *openaiParams, route string, build func() (genRequest, error)) {
	e := &sse{w: w}
	if err := s.checkModel(p.Model); err != nil {
		e.fail(r, err)
		return
	}
	opts, pol, err := p.toRuntime(s)
	if err != nil {
		e.fail(r, err)
		return
	}
	g, err := build()
	if err != nil {
		e.fail(r, err)
		return
	}
	g.route, g.document, g.policy, g.opts = route, p.Document, pol, opts
	release, ok := s.admit(w, r)
	if !ok {
		return
	}
	defer release()

	chat := route == "chat"
	id, created := newID("cmpl-"), time.Now().Unix()
	object, streamObject := "text_completion", "text_completion"
	if chat {
		id, object, streamObject = newID("chatcmpl-"), "chat.completion", "chat.completion.chunk"
	}
	chunk := func(text string, finish *string) map[string]any {
		c := map[string]any{"index": 0, "finish_reason": finish}
		if chat {
			delta := map[string]any{}
			if text != "" {
				delta["content"] = text
			}
			c["delta"] = delta
		} else {
			c["text"] = text
			c["logprobs"] = nil
		}
		return map[string]any{"id": id, "object": streamObject, "created": created, "model": s.cfg.ModelName, "choices": []any{c}}
	}
	if !chat {
		chunk = func(text string, finish *string) map[string]any {
			return map[string]any{"id": id, "object": "text_completion", "created": created, "model": s.cfg.ModelName,
				"choices": []any{map[string]any{"index": 0, "text": text, "logprobs": nil, "finish_reason": finish}}}
		}
	}
	var onToken func(runtime.Token) error
	if p.Stream {
		if chat { // the first chunk carries the role
			first := chunk("", nil)
			first["choices"].([]any)[0].(map[string]any)["delta"] = map[string]any{"role": "assistant", "content": ""}
			if err := e.send(first); err != nil {
				return
			}
		}
		onToken = func(t runtime.Token) error {
			if t.Text == "" {
				return nil
			}
			return e.send(chunk(t.Text, nil))
		}
	}
	res, err := s.generate(r.Context(), m, g, onToken)
	if err != nil {
		e.fail(r, err)
		return
	}
	finish := finishReason(res.StopReason)
	if p.Stream {
		last := chunk("", &finish)
		if p.StreamOptions != nil && p.StreamOptions.IncludeUsage {
			last["usage"] = nil
		}
		e.send(last)
		if p.StreamOptions != nil && p.StreamOptions.IncludeUsage {
			e.send(map[string]any{"id": id, "object": streamObject, "created": created, "model": s.cfg.ModelName,
				"choices": []any{}, "usage": usageOf(res), "timings": timingsOf(res)})
		}
		e.send("[DONE]")
		return
	}
	choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
	if chat {
		choice["message"] = map[string]any{"role": "assistant", "content": res.Text}
	} else {
		choice["text"] = res.Text
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": s.cfg.ModelName,
		"choices": []any{choice}, "usage": usageOf(res), "timings": timingsOf(res)})
}
