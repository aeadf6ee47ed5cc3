// Package kvlangchaingo makes a kvrecall model a langchaingo llms.Model,
// in process: no server, no HTTP.
//
//	m, err := kvrecall.Open(ctx, "model.gguf", kvrecall.Options{})
//	llm := kvlangchaingo.New(m, kvlangchaingo.Options{})
//	resp, err := llm.GenerateContent(ctx, msgs,
//		llms.WithStreamingFunc(print), llms.WithStopWords([]string{"Observation:"}),
//		kvlangchaingo.WithDocument("book")) // after an ingested document: no re-prefill
//
// langchaingo's call options map to kvrecall's GenerateOptions: MaxTokens,
// Temperature, TopK, TopP, Seed, RepetitionPenalty, StopWords,
// StreamingFunc, JSONMode, Tools and ToolChoice (and the deprecated
// Functions and FunctionCallBehavior). Options kvrecall cannot honour
// (several candidates, frequency or presence penalties, image parts) are
// errors naming the option, never silently dropped. Usage is in each
// choice's GenerationInfo under OpenAI's keys (PromptTokens,
// CompletionTokens, TotalTokens, PromptCachedTokens) plus kvrecall's own
// (PagesRetrieved, RetrievedKVBytes, ResidentKVBytes).
//
// The package is its own Go module so that kvrecall's core does not
// depend on langchaingo.
package kvlangchaingo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/tmc/langchaingo/llms"

	"github.com/kvrecall/kvrecall"
)

// Options are an LLM's defaults; call options override them per call.
type Options struct {
	// Document, if set, answers every call after this ingested document's
	// pages (see WithDocument).
	Document string
	// Method and Budget: the paging method and the tokens each query
	// attends to (see kvrecall.GenerateOptions); "" and 0 take the
	// Model's defaults.
	Method string
	Budget int
	// MaxTokens caps answers of calls that set none; 0 means until the
	// context is full.
	MaxTokens int
}

// LLM is a kvrecall model as a langchaingo llms.Model. It is safe for
// concurrent use, as the Model is.
type LLM struct {
	m    *kvrecall.Model
	opts Options
}

var _ llms.Model = (*LLM)(nil)

// New wraps an open model. The LLM does not own it: close the model
// yourself when done.
func New(m *kvrecall.Model, opts Options) *LLM { return &LLM{m: m, opts: opts} }

// Metadata keys of this package's call options (llms.CallOptions.Metadata).
const (
	MetaDocument = "kvrecall.document"
	MetaMethod   = "kvrecall.method"
	MetaBudget   = "kvrecall.budget"
	MetaFormat   = "kvrecall.format"
)

// withMeta sets one metadata key on a copy of the map, so that a map the
// caller passed to llms.WithMetadata is never written to.
func withMeta(key string, v any) llms.CallOption {
	return func(o *llms.CallOptions) {
		md := make(map[string]any, len(o.Metadata)+1)
		for k, x := range o.Metadata {
			md[k] = x
		}
		md[key] = v
		o.Metadata = md
	}
}

// WithDocument answers the call after the document ingested under id
// (kvrecall.Model.Ingest): its pages are reused, not prefilled again, so
// an agent can ask a long document many questions. The messages are
// rendered with the chat template (without BOS) after the document;
// usage's PromptCachedTokens counts the document's tokens.
func WithDocument(id string) llms.CallOption { return withMeta(MetaDocument, id) }

// WithMethod sets the call's paging method ("retro", "quest", "dense",
// "retro+heads", ...).
func WithMethod(method string) llms.CallOption { return withMeta(MetaMethod, method) }

// WithBudget sets the tokens each query attends to under the method.
func WithBudget(tokens int) llms.CallOption { return withMeta(MetaBudget, tokens) }

// WithFormat constrains the answer with llama.cpp's grammar sampler to a
// JSON Schema (or `"json"` for any object; JSONMode is the same).
func WithFormat(schema json.RawMessage) llms.CallOption { return withMeta(MetaFormat, schema) }

// Call answers one prompt, as a human message (llms.GenerateFromSinglePrompt).
func (l *LLM) Call(ctx context.Context, prompt string, options ...llms.CallOption) (string, error) {
	return llms.GenerateFromSinglePrompt(ctx, l, prompt, options...)
}

// GenerateContent answers messages with the model's chat template. A
// model answer that calls a tool comes back in the choice's ToolCalls
// (and FuncCall, for agents that read the legacy field); a call to an
// unknown tool or malformed call JSON is an error wrapping
// kvrecall.ErrToolCall that quotes what the model wrote.
func (l *LLM) GenerateContent(ctx context.Context, messages []llms.MessageContent, options ...llms.CallOption) (*llms.ContentResponse, error) {
	var co llms.CallOptions
	for _, o := range options {
		o(&co)
	}
	msgs, err := convertMessages(messages)
	if err != nil {
		return nil, err
	}
	opts, err := l.generateOptions(ctx, &co)
	if err != nil {
		return nil, err
	}
	res, err := l.m.Chat(ctx, msgs, opts)
	if err != nil {
		return nil, fmt.Errorf("kvrecall: %w", err)
	}
	return &llms.ContentResponse{Choices: []*llms.ContentChoice{choice(res)}}, nil
}

// generateOptions maps langchaingo's call options onto kvrecall's.
func (l *LLM) generateOptions(ctx context.Context, co *llms.CallOptions) (kvrecall.GenerateOptions, error) {
	opts := kvrecall.GenerateOptions{
		MaxTokens: l.opts.MaxTokens, Document: l.opts.Document, Method: l.opts.Method, Budget: l.opts.Budget,
		Stop: co.StopWords,
		Sampling: kvrecall.Sampling{Temperature: float32(co.Temperature), TopK: co.TopK, TopP: float32(co.TopP),
			Seed: co.Seed, RepeatPenalty: float32(co.RepetitionPenalty)},
	}
	if co.MaxTokens > 0 {
		opts.MaxTokens = co.MaxTokens
	}
	switch {
	case co.CandidateCount > 1:
		return opts, fmt.Errorf("kvrecall: CandidateCount %d: one candidate per call", co.CandidateCount)
	case co.N > 1:
		return opts, fmt.Errorf("kvrecall: N %d: one candidate per call", co.N)
	case co.FrequencyPenalty != 0:
		return opts, fmt.Errorf("kvrecall: FrequencyPenalty is not supported (use RepetitionPenalty)")
	case co.PresencePenalty != 0:
		return opts, fmt.Errorf("kvrecall: PresencePenalty is not supported (use RepetitionPenalty)")
	case co.MinLength != 0 || co.MaxLength != 0:
		return opts, fmt.Errorf("kvrecall: MinLength and MaxLength are not supported (use MaxTokens)")
	}
	if err := applyMetadata(&opts, co.Metadata); err != nil {
		return opts, err
	}
	if co.JSONMode || co.ResponseMIMEType == "application/json" {
		if len(opts.Format) == 0 {
			opts.Format = json.RawMessage(`"json"`)
		}
	} else if co.ResponseMIMEType != "" && co.ResponseMIMEType != "text/plain" {
		return opts, fmt.Errorf("kvrecall: ResponseMIMEType %q (application/json or text/plain)", co.ResponseMIMEType)
	}
	tools, err := convertTools(co.Tools, co.Functions)
	if err != nil {
		return opts, err
	}
	opts.Tools = tools
	if opts.ToolChoice, err = toolChoice(co.ToolChoice, co.FunctionCallBehavior); err != nil {
		return opts, err
	}
	if co.StreamingFunc != nil || co.StreamingReasoningFunc != nil {
		stream, reasoning := co.StreamingFunc, co.StreamingReasoningFunc
		opts.OnToken = func(t kvrecall.Token) error {
			if t.Text == "" {
				return nil
			}
			if stream != nil {
				if err := stream(ctx, []byte(t.Text)); err != nil {
					return err
				}
			}
			if reasoning != nil {
				return reasoning(ctx, nil, []byte(t.Text))
			}
			return nil
		}
	}
	return opts, nil
}

func applyMetadata(opts *kvrecall.GenerateOptions, md map[string]any) error {
	if v, ok := md[MetaDocument]; ok {
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("kvrecall: metadata %s is %T, not a document id", MetaDocument, v)
		}
		opts.Document = s
	}
	if v, ok := md[MetaMethod]; ok {
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("kvrecall: metadata %s is %T, not a method name", MetaMethod, v)
		}
		opts.Method = s
	}
	if v, ok := md[MetaBudget]; ok {
		n, ok := v.(int)
		if !ok {
			return fmt.Errorf("kvrecall: metadata %s is %T, not an int", MetaBudget, v)
		}
		opts.Budget = n
	}
	if v, ok := md[MetaFormat]; ok {
		switch f := v.(type) {
		case json.RawMessage:
			opts.Format = f
		case string:
			opts.Format = json.RawMessage(f)
		default:
			return fmt.Errorf("kvrecall: metadata %s is %T, not a JSON Schema", MetaFormat, v)
		}
	}
	return nil
}

// convertMessages maps langchaingo's roles and parts onto chat turns.
func convertMessages(in []llms.MessageContent) ([]kvrecall.Message, error) {
	out := make([]kvrecall.Message, 0, len(in))
	for i, mc := range in {
		var m kvrecall.Message
		switch mc.Role {
		case llms.ChatMessageTypeSystem:
			m.Role = "system"
		case llms.ChatMessageTypeHuman, llms.ChatMessageTypeGeneric:
			m.Role = "user"
		case llms.ChatMessageTypeAI:
			m.Role = "assistant"
		case llms.ChatMessageTypeTool, llms.ChatMessageTypeFunction:
			m.Role = "tool"
		default:
			return nil, fmt.Errorf("kvrecall: message %d: unknown role %q", i, mc.Role)
		}
		var text strings.Builder
		for j, p := range mc.Parts {
			switch p := p.(type) {
			case llms.TextContent:
				text.WriteString(p.Text)
			case llms.ToolCall:
				if p.FunctionCall == nil {
					return nil, fmt.Errorf("kvrecall: message %d, part %d: tool call %q has no function", i, j, p.ID)
				}
				args := json.RawMessage(p.FunctionCall.Arguments)
				if len(strings.TrimSpace(p.FunctionCall.Arguments)) == 0 {
					args = json.RawMessage("{}")
				}
				if !json.Valid(args) {
					return nil, fmt.Errorf("kvrecall: message %d, part %d: arguments of tool call %s are not JSON: %q", i, j, p.FunctionCall.Name, p.FunctionCall.Arguments)
				}
				m.ToolCalls = append(m.ToolCalls, kvrecall.ToolCall{Name: p.FunctionCall.Name, Arguments: args})
			case llms.ToolCallResponse:
				text.WriteString(p.Content)
			default:
				return nil, fmt.Errorf("kvrecall: message %d, part %d: %T parts are not supported (text only)", i, j, p)
			}
		}
		m.Content = text.String()
		out = append(out, m)
	}
	return out, nil
}

func convertTools(tools []llms.Tool, functions []llms.FunctionDefinition) ([]kvrecall.Tool, error) {
	var out []kvrecall.Tool
	add := func(fd llms.FunctionDefinition) error {
		t := kvrecall.Tool{Name: fd.Name, Description: fd.Description}
		if fd.Parameters != nil {
			var err error
			switch p := fd.Parameters.(type) {
			case json.RawMessage:
				t.Parameters = p
			case []byte:
				t.Parameters = p
			case string:
				t.Parameters = json.RawMessage(p)
			default:
				if t.Parameters, err = json.Marshal(p); err != nil {
					return fmt.Errorf("kvrecall: tool %s: parameters: %w", fd.Name, err)
				}
			}
			if !json.Valid(t.Parameters) {
				return fmt.Errorf("kvrecall: tool %s: parameters are not JSON", fd.Name)
			}
		}
		out = append(out, t)
		return nil
	}
	for i, t := range tools {
		if t.Type != "function" && t.Type != "" {
			return nil, fmt.Errorf("kvrecall: tool %d has type %q (only function tools)", i, t.Type)
		}
		if t.Function == nil {
			return nil, fmt.Errorf("kvrecall: tool %d has no function", i)
		}
		if err := add(*t.Function); err != nil {
			return nil, err
		}
	}
	for _, f := range functions {
		if err := add(f); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// toolChoice reads langchaingo's ToolChoice (any): a string ("auto",
// "none", "required" or a tool's name), an llms.ToolChoice, or its JSON
// form as a map.
func toolChoice(c any, fcb llms.FunctionCallBehavior) (string, error) {
	switch c := c.(type) {
	case nil:
		switch fcb {
		case "":
			return "", nil
		case llms.FunctionCallBehaviorAuto, llms.FunctionCallBehaviorNone:
			return string(fcb), nil
		default:
			return "", fmt.Errorf("kvrecall: FunctionCallBehavior %q (auto or none)", fcb)
		}
	case string:
		return c, nil
	case llms.ToolChoice:
		return choiceOf(c.Type, c.Function)
	case *llms.ToolChoice:
		if c == nil {
			return "", nil
		}
		return choiceOf(c.Type, c.Function)
	case map[string]any:
		b, _ := json.Marshal(c)
		var tc llms.ToolChoice
		if err := json.Unmarshal(b, &tc); err != nil {
			return "", fmt.Errorf("kvrecall: ToolChoice %v: %w", c, err)
		}
		return choiceOf(tc.Type, tc.Function)
	default:
		return "", fmt.Errorf("kvrecall: ToolChoice of type %T (a string or llms.ToolChoice)", c)
	}
}

func choiceOf(typ string, fn *llms.FunctionReference) (string, error) {
	if typ == "function" {
		if fn == nil || fn.Name == "" {
			return "", errors.New("kvrecall: ToolChoice of type function names no function")
		}
		return fn.Name, nil
	}
	return typ, nil
}

var callID atomic.Int64

// choice is a response as a langchaingo choice, usage in GenerationInfo.
func choice(res *kvrecall.Response) *llms.ContentChoice {
	u := res.Usage
	c := &llms.ContentChoice{
		Content:    res.Text,
		StopReason: stopReason(res),
		GenerationInfo: map[string]any{
			"PromptTokens":       u.PromptTokens,
			"CompletionTokens":   u.CompletionTokens,
			"TotalTokens":        u.TotalTokens,
			"PromptCachedTokens": u.CachedTokens,
			"PagesRetrieved":     u.PagesRetrieved,
			"RetrievedKVBytes":   u.RetrievedKVBytes,
			"ResidentKVBytes":    u.ResidentKVBytes,
		},
	}
	for _, tc := range res.ToolCalls {
		fc := &llms.FunctionCall{Name: tc.Name, Arguments: string(tc.Arguments)}
		c.ToolCalls = append(c.ToolCalls, llms.ToolCall{ID: fmt.Sprintf("call_%d", callID.Add(1)), Type: "function", FunctionCall: fc})
		if c.FuncCall == nil {
			c.FuncCall = fc
		}
	}
	return c
}

// stopReason uses OpenAI's finish reasons, which agents compare against.
func stopReason(res *kvrecall.Response) string {
	if len(res.ToolCalls) > 0 {
		return "tool_calls"
	}
	switch res.StopReason {
	case kvrecall.StopEOG, kvrecall.StopString:
		return "stop"
	case kvrecall.StopLength, kvrecall.StopContext:
		return "length"
	default:
		return string(res.StopReason)
	}
}
