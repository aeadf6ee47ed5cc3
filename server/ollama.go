package server

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/types/model"

	"github.com/kvrecall/kvrecall/internal/chat"
	"github.com/kvrecall/kvrecall/runtime"
)

// ollamaOptions reads Ollama's options (num_ctx, num_predict, temperature,
// top_k, top_p, min_p, seed, stop, repeat_penalty, repeat_last_n) with
// Ollama's defaults.
func ollamaOptions(m map[string]any) (runtime.GenerateOptions, int, error) {
	o := api.DefaultOptions()
	o.Runner.NumCtx = 0
	if err := o.FromMap(m); err != nil {
		return runtime.GenerateOptions{}, 0, badRequest("options: %v", err)
	}
	g := runtime.GenerateOptions{
		Stop: o.Stop,
		Sampling: runtime.Sampling{Temperature: o.Temperature, TopK: o.TopK, TopP: o.TopP, MinP: o.MinP,
			Seed: o.Seed, RepeatPenalty: o.RepeatPenalty, RepeatLastN: o.RepeatLastN},
	}
	if err := checkSampling("options.", g.Sampling); err != nil {
		return g, 0, err
	}
	if err := checkStop("options.stop", o.Stop); err != nil {
		return g, 0, err
	}
	switch {
	case o.NumPredict < -2:
		return g, 0, badRequest("options.num_predict must be -1 (no limit), -2 (fill the context) or at least 0 (got %d)", o.NumPredict)
	case o.NumCtx < 0:
		return g, 0, badRequest("options.num_ctx must be at least 0 (got %d)", o.NumCtx)
	}
	if o.NumPredict > 0 {
		g.MaxTokens = o.NumPredict
	}
	if o.RepeatLastN == 0 { // Ollama's "off"; the runtime reads 0 as its default window
		g.Sampling.RepeatPenalty = 0
	}
	return g, o.NumCtx, nil
}

// ndjson streams one JSON object per line; the headers go out with the first.
type ndjson struct {
	w       http.ResponseWriter
	started bool
}

// send writes one line and flushes it; a failed write is errWriteTimeout
// or errClientGone.
func (n *ndjson) send(v any) error {
	if !n.started {
		n.started = true
		n.w.Header().Set("Content-Type", "application/x-ndjson")
		n.w.WriteHeader(http.StatusOK)
	}
	if err := json.NewEncoder(n.w).Encode(v); err != nil {
		return writeFailure(err)
	}
	if err := http.NewResponseController(n.w).Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return writeFailure(err)
	}
	return nil
}

// ndjsonFail answers an error: with its status before the first line, as a
// final {"error": "..."} line after it (never a done line), and not at all
// to a client that is gone.
func (s *Server) ndjsonFail(n *ndjson, r *http.Request, err error) {
	status, msg, silent := s.failure(r, err)
	if silent {
		return
	}
	if !n.started {
		writeError(n.w, r, status, msg)
		return
	}
	n.send(map[string]string{"error": msg})
}

func (s *Server) metricsOf(res *runtime.Result, start time.Time) api.Metrics {
	return api.Metrics{
		TotalDuration:      time.Since(start),
		PromptEvalCount:    res.PromptTokens,
		PromptEvalDuration: res.PrefillDuration,
		EvalCount:          res.GeneratedTokens,
		EvalDuration:       res.DecodeDuration,
	}
}

// kvrecallFields are kvrecall's extensions of Ollama's requests.
type kvrecallFields struct {
	Document string `json:"document"`
	pagingJSON
}

func (s *Server) ollamaGenerate(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		api.GenerateRequest
		kvrecallFields
	}
	if !decodeJSON(w, r, &req) {
		return
	}
	nd := &ndjson{w: w}
	if err := s.checkModel(req.Model); err != nil {
		s.metrics.outcome("generate", outcomeInvalid)
		s.ndjsonFail(nd, r, err)
		return
	}
	if req.Prompt == "" && req.Document == "" {
		// Ollama loads the model and answers done on an empty prompt.
		writeJSON(w, http.StatusOK, api.GenerateResponse{Model: req.Model, CreatedAt: time.Now().UTC(), Done: true, DoneReason: "load"})
		return
	}
	prompt, err := s.generatePrompt(&req.GenerateRequest, req.Document != "")
	if err == nil {
		if prompt.grammar, err = runtime.FormatGrammar(req.Format); err != nil {
			err = badRequest("format: %v", err)
		}
	}
	if err != nil {
		s.metrics.outcome("generate", outcomeInvalid)
		s.ndjsonFail(nd, r, err)
		return
	}
	s.ollamaRun(w, r, m, nd, req.Model, req.Stream, req.Options, req.kvrecallFields, "generate", prompt, false)
}

// generatePrompt applies the chat template unless the request is raw or the
// model has none (then system and prompt are joined by a blank line).
func (s *Server) generatePrompt(req *api.GenerateRequest, afterDocument bool) (genRequest, error) {
	if req.Raw || !s.chat.HasTemplate() {
		p := req.Prompt
		if req.System != "" && !req.Raw {
			p = req.System + "\n\n" + p
		}
		return genRequest{prompt: p, addBOS: !afterDocument}, nil
	}
	var msgs []message
	if req.System != "" {
		msgs = append(msgs, message{Role: "system", Content: req.System})
	}
	msgs = append(msgs, message{Role: "user", Content: req.Prompt})
	p, err := s.chat.Render(msgs, !afterDocument)
	if err != nil {
		return genRequest{}, badRequest("%v", err)
	}
	return genRequest{prompt: p, addBOS: !afterDocument && !s.chat.StartsWithBOS(p)}, nil
}

func (s *Server) ollamaChat(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req struct {
		api.ChatRequest
		kvrecallFields
		// Read here rather than as api.Tools, whose parameters keep only
		// type, required and properties (the grammar of a forced call
		// needs the whole schema), and whose errors name no index.
		Tools json.RawMessage `json:"tools"`
		// tool_choice is kvrecall's extension, as on the OpenAI route
		// ("auto", "none", "required" or a tool's name).
		ToolChoice string `json:"tool_choice"`
	}
	if !decodeJSON(w, r, &req) {
		return
	}
	nd := &ndjson{w: w}
	if err := s.checkModel(req.Model); err != nil {
		s.metrics.outcome("chat", outcomeInvalid)
		s.ndjsonFail(nd, r, err)
		return
	}
	if len(req.Messages) == 0 {
		writeJSON(w, http.StatusOK, api.ChatResponse{Model: req.Model, CreatedAt: time.Now().UTC(), Message: api.Message{Role: "assistant"}, Done: true, DoneReason: "load"})
		return
	}
	g, err := s.ollamaChatRequest(req.Messages, req.Tools, req.ToolChoice, req.Format, req.Document != "")
	if err != nil {
		s.metrics.outcome("chat", outcomeInvalid)
		s.ndjsonFail(nd, r, err)
		return
	}
	s.ollamaRun(w, r, m, nd, req.Model, req.Stream, req.Options, req.kvrecallFields, "chat", g, true)
}

// ollamaChatRequest renders an /api/chat request's messages with its
// tools, and builds the grammar of its format ("json" or a schema).
func (s *Server) ollamaChatRequest(in []api.Message, rawTools json.RawMessage, choice string, format json.RawMessage, afterDocument bool) (genRequest, error) {
	tools, err := parseTools(rawTools)
	if err != nil {
		return genRequest{}, err
	}
	offered, grammar, forced, err := chatConstraints(tools, choice, "tool_choice", format, "format")
	if err != nil {
		return genRequest{}, err
	}
	msgs := make([]message, len(in))
	for i, mm := range in {
		msgs[i] = message{Role: mm.Role, Content: mm.Content}
		for j, tc := range mm.ToolCalls {
			args, err := json.Marshal(tc.Function.Arguments)
			if err != nil || string(args) == "null" {
				args = []byte("{}")
			}
			if tc.Function.Name == "" {
				return genRequest{}, badRequest("messages[%d].tool_calls[%d].function.name is missing", i, j)
			}
			msgs[i].ToolCalls = append(msgs[i].ToolCalls, chat.ToolCall{Name: tc.Function.Name, Arguments: args})
		}
	}
	p, err := s.chat.RenderTools(msgs, offered, !afterDocument)
	if err != nil {
		return genRequest{}, badRequest("%v", err)
	}
	return genRequest{prompt: p, addBOS: !afterDocument && !s.chat.StartsWithBOS(p), grammar: grammar, tools: offered, forced: forced}, nil
}

// ollamaToolCalls renders calls as Ollama's message.tool_calls
// (arguments as a JSON object).
func ollamaToolCalls(calls []chat.ToolCall) ([]api.ToolCall, error) {
	out := make([]api.ToolCall, len(calls))
	for i, c := range calls {
		out[i].Function.Index, out[i].Function.Name = i, c.Name
		if err := json.Unmarshal(c.Arguments, &out[i].Function.Arguments); err != nil {
			return nil, fmt.Errorf("tool call %s: %w", c.Name, err)
		}
	}
	return out, nil
}

// ollamaRun validates, queues and runs a generate or chat request and
// answers with NDJSON (or one object when stream is false). Client errors
// are found before the first line.
func (s *Server) ollamaRun(w http.ResponseWriter, r *http.Request, m *runtime.Model, nd *ndjson, name string, stream *bool,
	options map[string]any, kv kvrecallFields, route string, g genRequest, chat bool) {
	start := time.Now()
	var err error
	defer func() {
		s.metrics.outcome(route, outcomeOf(err, r))
		if err != nil {
			s.ndjsonFail(nd, r, err)
		}
	}()
	opts, numCtx, err := ollamaOptions(options)
	if err != nil {
		return
	}
	if name == "" {
		name = s.cfg.ModelName
	}
	if g.policy, err = s.policy(kv.pagingJSON); err != nil {
		return
	}
	g.route, g.document, g.opts, g.numCtx = route, kv.Document, opts, numCtx
	if err = s.prepare(m, &g); err != nil {
		return
	}
	release, err := s.admit(w, r)
	if err != nil {
		return
	}
	defer release()
	streaming := stream == nil || *stream
	piece := func(text string, done bool) any {
		if chat {
			return api.ChatResponse{Model: name, CreatedAt: time.Now().UTC(), Message: api.Message{Role: "assistant", Content: text}, Done: done}
		}
		return api.GenerateResponse{Model: name, CreatedAt: time.Now().UTC(), Response: text, Done: done}
	}
	var onToken func(runtime.Token) error
	if streaming {
		onToken = func(t runtime.Token) error {
			if t.Text == "" {
				return nil
			}
			return nd.send(piece(t.Text, false))
		}
	}
	ts := newToolStream(g.tools, g.forced)
	res, err := s.generate(r.Context(), m, g, nil, ts.wrap(onToken))
	if err != nil {
		return
	}
	content, calls, err := ts.finish(res, onToken)
	if err != nil {
		return
	}
	var toolCalls []api.ToolCall
	if toolCalls, err = ollamaToolCalls(calls); err != nil {
		return
	}
	text := ""
	if !streaming {
		text = content
	} else if len(toolCalls) > 0 {
		// Ollama streams the calls in a message of their own before the
		// done line.
		if err = nd.send(api.ChatResponse{Model: name, CreatedAt: time.Now().UTC(),
			Message: api.Message{Role: "assistant", ToolCalls: toolCalls}}); err != nil {
			return
		}
		toolCalls = nil
	}
	reason := finishReason(res.StopReason)
	// Methods with a per-request cut-off (probe) report each layer's tokens
	// attended (0: a dense layer) in layer_budgets, as timings.layer_budgets
	// on the OpenAI routes; other methods leave it out.
	var final any
	if chat {
		final = struct {
			api.ChatResponse
			LayerBudgets []int `json:"layer_budgets,omitempty"`
		}{api.ChatResponse{Model: name, CreatedAt: time.Now().UTC(), Message: api.Message{Role: "assistant", Content: text, ToolCalls: toolCalls},
			Done: true, DoneReason: reason, Metrics: s.metricsOf(res, start)}, res.LayerBudgets}
	} else {
		final = struct {
			api.GenerateResponse
			LayerBudgets []int `json:"layer_budgets,omitempty"`
		}{api.GenerateResponse{Model: name, CreatedAt: time.Now().UTC(), Response: text, Done: true, DoneReason: reason, Metrics: s.metricsOf(res, start)}, res.LayerBudgets}
	}
	if !streaming {
		writeJSON(w, http.StatusOK, final)
		return
	}
	err = nd.send(final)
}

func (s *Server) modelDetails(m *runtime.Model) api.ModelDetails {
	c := m.Config()
	params := 0
	for _, t := range m.File().Tensors {
		params += int(t.Elements())
	}
	q := "F32"
	if ft, ok := m.File().Uint("general.file_type"); ok {
		switch ft {
		case 1:
			q = "F16"
		case 7:
			q = "Q8_0"
		case 0:
			q = "F32"
		default:
			q = fmt.Sprintf("type %d", ft)
		}
	}
	return api.ModelDetails{Format: "gguf", Family: c.Arch, Families: []string{c.Arch}, ParameterSize: humanCount(params), QuantizationLevel: q}
}

func humanCount(n int) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.1fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	}
	return fmt.Sprintf("%.1fK", float64(n)/1e3)
}

func (s *Server) ollamaTags(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var size int64
	var mod time.Time
	if st, err := os.Stat(m.Path()); err == nil {
		size, mod = st.Size(), st.ModTime()
	}
	fp := m.Fingerprint()
	writeJSON(w, http.StatusOK, api.ListResponse{Models: []api.ListModelResponse{{
		Name: s.cfg.ModelName + ":latest", Model: s.cfg.ModelName + ":latest", ModifiedAt: mod, Size: size,
		Digest: hex.EncodeToString(fp[:]), Details: s.modelDetails(m),
	}}})
}

func (s *Server) ollamaShow(w http.ResponseWriter, r *http.Request, m *runtime.Model) {
	var req api.ShowRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	name := req.Model
	if name == "" {
		name = req.Name
	}
	if err := s.checkModel(name); err != nil {
		status, msg := statusOf(err)
		writeError(w, r, status, msg)
		return
	}
	info := map[string]any{}
	for _, kv := range m.File().KVs {
		if _, isArray := kv.Value.([]string); isArray {
			continue // vocabularies are huge; Ollama leaves them out too
		}
		switch v := kv.Value.(type) {
		case []int32, []float32:
			continue
		default:
			info[kv.Key] = v
		}
	}
	// Where it runs, beside the file's keys (kvrecall's own prefix).
	use := m.Device()
	info["kvrecall.device"] = use.Device.Name
	info["kvrecall.device.description"] = use.Device.Description
	info["kvrecall.device.backend"] = use.Device.Backend
	info["kvrecall.device.kind"] = string(use.Device.Kind)
	info["kvrecall.device.loaded"] = use.Device.Loaded
	info["kvrecall.gpu_layers"] = use.GPULayers
	info["kvrecall.layers"] = use.Layers + 1
	writeJSON(w, http.StatusOK, api.ShowResponse{
		Modelfile:    "# served by kvrecall\nFROM " + filepath.Base(m.Path()) + "\n", // not where the server keeps it
		Parameters:   fmt.Sprintf("num_ctx %d", m.Options().ContextLength),
		Template:     s.chat.Source(),
		Details:      s.modelDetails(m),
		ModelInfo:    info,
		Capabilities: s.capabilities(),
		ModifiedAt:   s.loaded,
	})
}

func (s *Server) ollamaVersion(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"version": Version})
}

// capabilities are what /api/show reports: completion always, tools when
// the chat template reads `tools` (clients such as Ollama's check this
// before sending tools).
func (s *Server) capabilities() []model.Capability {
	c := []model.Capability{model.CapabilityCompletion}
	if s.chat.HasTemplate() && strings.Contains(s.chat.Source(), "tools") {
		c = append(c, model.CapabilityTools)
	}
	return c
}
