package server

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/kvrecall/kvrecall/heads"
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
// extensions: document and the paging overrides (pagingJSON), and
// llama-server's top_k, min_p, repeat_penalty.
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
	// response_format (OpenAI; llama-server also takes it on completions).
	ResponseFormat json.RawMessage `json:"response_format"`
	pagingJSON
}

// Default sampling, as Ollama's: clients that send nothing get
// temperature 0.8, top-k 40, top-p 0.9 and a random seed.
var defaultSampling = runtime.Sampling{Temperature: 0.8, TopK: 40, TopP: 0.9, Seed: -1}

func (p *openaiParams) toRuntime(s *Server) (runtime.GenerateOptions, runtime.PolicyOptions, error) {
	o := runtime.GenerateOptions{Sampling: defaultSampling, Stop: p.Stop}
	if p.N != nil && *p.N != 1 {
		return o, runtime.PolicyOptions{}, badRequest("n must be 1")
	}
	field := "max_tokens"
	if p.MaxCompletionTokens != nil {
		p.MaxTokens, field = p.MaxCompletionTokens, "max_completion_tokens"
	}
	if p.MaxTokens != nil {
		if *p.MaxTokens < 1 {
			return o, runtime.PolicyOptions{}, badRequest("%s must be at least 1", field)
		}
		o.MaxTokens = *p.MaxTokens
	}
	if p.Temperature != nil {
		o.Sampling.Temperature = *p.Temperature
	}
	if p.TopP != nil {
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
	if err := checkSampling("", o.Sampling); err != nil {
		return o, runtime.PolicyOptions{}, err
	}
	if err := checkStop("stop", p.Stop); err != nil {
		return o, runtime.PolicyOptions{}, err
	}
	pol, err := s.policy(p.pagingJSON)
	return o, pol, err
}

// Bounds of the sampling fields. Outside them the sampler would compute
// nonsense (a repeat penalty of 1e-38 multiplies logits into infinities and
// NaN) or the value is a typo; the request is refused naming the field.
const (
	maxTemperature   = 2
	minRepeatPenalty = 0.01 // besides 0, which disables it
	maxRepeatPenalty = 100.0
	maxStopStrings   = 16
)

// checkSampling validates sampling settings; prefix names where they came
// from in the request ("" for OpenAI's top level, "options." for Ollama).
func checkSampling(prefix string, sm runtime.Sampling) error {
	bad := func(field, rule string, v any) error {
		return badRequest("%s%s must be %s (got %v)", prefix, field, rule, v)
	}
	finite := func(f float32) bool { return !math.IsNaN(float64(f)) && !math.IsInf(float64(f), 0) }
	switch {
	case !finite(sm.Temperature) || sm.Temperature < 0 || sm.Temperature > maxTemperature:
		return bad("temperature", fmt.Sprintf("in [0, %d]", maxTemperature), sm.Temperature)
	case !finite(sm.TopP) || sm.TopP < 0 || sm.TopP > 1:
		return bad("top_p", "in [0, 1] (0 and 1 disable it)", sm.TopP)
	case sm.TopK < 0:
		return bad("top_k", "at least 0 (0 disables it)", sm.TopK)
	case !finite(sm.MinP) || sm.MinP < 0 || sm.MinP > 1:
		return bad("min_p", "in [0, 1] (0 disables it)", sm.MinP)
	case !finite(sm.RepeatPenalty) || sm.RepeatPenalty < 0 || (sm.RepeatPenalty > 0 && sm.RepeatPenalty < minRepeatPenalty) || sm.RepeatPenalty > maxRepeatPenalty:
		return bad("repeat_penalty", fmt.Sprintf("0 (off) or in [%g, %g]", minRepeatPenalty, maxRepeatPenalty), sm.RepeatPenalty)
	case sm.Seed < -1:
		return bad("seed", "-1 (random) or at least 0", sm.Seed)
	case sm.RepeatLastN < -1:
		return bad("repeat_last_n", "-1 (the whole context), 0 (off) or positive", sm.RepeatLastN)
	}
	return nil
}

// checkStop validates stop strings.
func checkStop(field string, stop []string) error {
	for _, st := range stop {
		if st == "" {
			return badRequest("%s strings must not be empty", field)
		}
	}
	if len(stop) > maxStopStrings {
		return badRequest("%s: at most %d stop strings", field, maxStopStrings)
	}
	return nil
}

// SetHeadProfiles sets the head profiles requests may name in
// heads_profile (for "+heads" policies).
func (s *Server) SetHeadProfiles(p map[string]heads.Classes) {
	s.profilesMu.Lock()
	defer s.profilesMu.Unlock()
	s.profiles = p
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
	t := map[string]any{
		"prompt_n": res.PromptTokens, "prompt_ms": float64(res.PrefillDuration.Microseconds()) / 1000,
		"prompt_per_second": res.PrefillTokensPerSecond(), "cache_n": res.CachedTokens,
		"predicted_n": res.GeneratedTokens, "predicted_ms": float64(res.DecodeDuration.Microseconds()) / 1000,
		"predicted_per_second": res.DecodeTokensPerSecond(),
	}
	if res.LayerBudgets != nil {
		// Methods with a per-request cut-off (probe) report each layer's
		// tokens attended.
		t["layer_budgets"] = res.LayerBudgets
	}
	return t
}

// sse writes server-sent events; the headers go out with the first event.
type sse struct {
	w       http.ResponseWriter
	started bool
}

// send writes one event and flushes it. A failed write is errWriteTimeout
// (the client stopped reading) or errClientGone.
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
		return writeFailure(err)
	}
	if err := http.NewResponseController(e.w).Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return writeFailure(err)
	}
	return nil
}

// fail ends a request: a JSON error with its status if nothing was streamed
// yet, else an error event, OpenAI's {"error": {...}}, and no [DONE], so
// that a client can tell a cut stream from a complete one. Nothing is sent
// to a client that is gone or stopped reading.
func (s *Server) sseFail(e *sse, r *http.Request, err error) {
	status, msg, silent := s.failure(r, err)
	if silent {
		return
	}
	if !e.started {
		writeError(e.w, r, status, msg)
		return
	}
	e.send(map[string]any{"error": map[string]any{"message": msg, "type": errorType(status), "code": fmt.Sprint(status)}})
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
		s.metrics.outcome("completions", outcomeInvalid)
		writeError(w, r, http.StatusBadRequest, "prompt must be one string")
		return
	}
	s.openaiRun(w, r, m, &req.openaiParams, "completions", func() (genRequest, error) {
		format, field, err := parseResponseFormat(req.ResponseFormat)
		if err != nil {
			return genRequest{}, err
		}
		grammar, err := runtime.FormatGrammar(format)
		if err != nil {
			return genRequest{}, badRequest("%s: %v", field, err)
		}
		return genRequest{prompt: req.Prompt[0], addBOS: req.Document == "", grammar: grammar}, nil
	})
}

func (s *Server) openaiChat(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		openaiParams
		Messages   []openaiMessage `json:"messages"`
		Tools      json.RawMessage `json:"tools"`
		ToolChoice json.RawMessage `json:"tool_choice"`
	}
	if !decodeJSON(w, r, &req) {
		return
	}
	s.openaiRun(w, r, m, &req.openaiParams, "chat", func() (genRequest, error) {
		tools, err := parseTools(req.Tools)
		if err != nil {
			return genRequest{}, err
		}
		choice, err := parseToolChoice(req.ToolChoice)
		if err != nil {
			return genRequest{}, err
		}
		format, field, err := parseResponseFormat(req.ResponseFormat)
		if err != nil {
			return genRequest{}, err
		}
		offered, grammar, forced, err := chatConstraints(tools, choice, "tool_choice", format, field)
		if err != nil {
			return genRequest{}, err
		}
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			return genRequest{}, err
		}
		prompt, err := s.chat.RenderTools(msgs, offered, req.Document == "")
		if err != nil {
			return genRequest{}, badRequest("%v", err)
		}
		return genRequest{prompt: prompt, addBOS: req.Document == "" && !s.chat.StartsWithBOS(prompt),
			grammar: grammar, tools: offered, forced: forced}, nil
	})
}

// openaiRun validates, queues and runs a completion or chat request, and
// answers in OpenAI's format (SSE when streaming). Everything a client can
// get wrong is checked before the first byte, so streams too answer client
// errors with their status.
func (s *Server) openaiRun(w http.ResponseWriter, r *http.Request, m *runtime.Model, p *openaiParams, route string, build func() (genRequest, error)) {
	e := &sse{w: w}
	var err error
	defer func() {
		s.metrics.outcome(route, outcomeOf(err, r))
		if err != nil {
			s.sseFail(e, r, err)
		}
	}()
	if err = s.checkModel(p.Model); err != nil {
		return
	}
	opts, pol, err := p.toRuntime(s)
	if err != nil {
		return
	}
	g, err := build()
	if err != nil {
		return
	}
	g.route, g.document, g.policy, g.opts = route, p.Document, pol, opts
	if err = s.prepare(m, &g); err != nil {
		return
	}
	release, err := s.admit(w, r)
	if err != nil {
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
	var onStart func() error
	var onToken func(runtime.Token) error
	if p.Stream {
		if chat { // the first chunk carries the role
			onStart = func() error {
				first := chunk("", nil)
				first["choices"].([]any)[0].(map[string]any)["delta"] = map[string]any{"role": "assistant", "content": ""}
				return e.send(first)
			}
		}
		onToken = func(t runtime.Token) error {
			if t.Text == "" {
				return nil
			}
			return e.send(chunk(t.Text, nil))
		}
	}
	calls := newToolStream(g.tools, g.forced)
	res, err := s.generate(r.Context(), m, g, onStart, calls.wrap(onToken))
	if err != nil {
		return
	}
	text, toolCalls, err := calls.finish(res, onToken)
	if err != nil {
		return
	}
	finish := finishReason(res.StopReason)
	if len(toolCalls) > 0 {
		finish = "tool_calls"
	}
	if p.Stream {
		if len(toolCalls) > 0 {
			// Each call whole in one delta (OpenAI may split arguments
			// over several; clients concatenate either way).
			c := chunk("", nil)
			c["choices"].([]any)[0].(map[string]any)["delta"] = map[string]any{"tool_calls": openaiToolCalls(toolCalls, true)}
			if err = e.send(c); err != nil {
				return
			}
		}
		last := chunk("", &finish)
		if p.StreamOptions != nil && p.StreamOptions.IncludeUsage {
			last["usage"] = nil
		}
		if err = e.send(last); err != nil {
			return
		}
		if p.StreamOptions != nil && p.StreamOptions.IncludeUsage {
			if err = e.send(map[string]any{"id": id, "object": streamObject, "created": created, "model": s.cfg.ModelName,
				"choices": []any{}, "usage": usageOf(res), "timings": timingsOf(res)}); err != nil {
				return
			}
		}
		err = e.send("[DONE]")
		return
	}
	choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
	if chat {
		msg := map[string]any{"role": "assistant", "content": text}
		if len(toolCalls) > 0 {
			msg["tool_calls"] = openaiToolCalls(toolCalls, false)
			if text == "" {
				msg["content"] = nil // as OpenAI answers a call without text
			}
		}
		choice["message"] = msg
	} else {
		choice["text"] = res.Text
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": s.cfg.ModelName,
		"choices": []any{choice}, "usage": usageOf(res), "timings": timingsOf(res)})
}
