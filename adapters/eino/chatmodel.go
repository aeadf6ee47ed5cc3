// Package kveino makes a kvrecall model an eino model.ToolCallingChatModel,
// in process: no server, no HTTP. ReAct agents, graphs and chains of
// github.com/cloudwego/eino take it as they take a hosted model.
//
//	m, err := kvrecall.Open(ctx, "model.gguf", kvrecall.Options{})
//	cm, err := kveino.New(m, kveino.Config{})
//	withTools, err := cm.WithTools(infos) // a copy; cm is unchanged
//	msg, err := withTools.Generate(ctx, msgs, kveino.WithDocument("book")) // after an ingested document: no re-prefill
//
// eino's common options map to kvrecall's GenerateOptions: Temperature,
// MaxTokens, TopP, Stop, Tools and ToolChoice (with AllowedToolNames);
// this package's options add the document, the paging method and budget,
// a JSON Schema for the answer and sampling settings. Usage comes in
// ResponseMeta.Usage (PromptTokenDetails.CachedTokens: the document's
// tokens reused) and, with kvrecall's page counts, in Extra["kvrecall_usage"].
//
// Stream sends text as it is generated through schema.Pipe and, last, a
// message with the tool calls (whole, never fragments) and ResponseMeta.
// When tools are offered, text that is or may become a tool call is held
// back, so eino's ReAct agent, which decides "tool call or answer" from
// the first non-empty chunk, sees a call's chunk first.
//
// The package is its own Go module so that kvrecall's core does not
// depend on eino.
package kveino

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/cloudwego/eino/components/model"
	"github.com/cloudwego/eino/schema"

	"github.com/kvrecall/kvrecall"
)

// Config holds a ChatModel's defaults; options override them per call.
type Config struct {
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
	// Sampling is the default sampling (zero: greedy).
	Sampling kvrecall.Sampling
	// StreamBuffer is the chunks Stream buffers ahead of the reader
	// (default 16).
	StreamBuffer int
}

// ChatModel is a kvrecall model as an eino ToolCallingChatModel. It is
// immutable and safe for concurrent use: WithTools returns a new one.
type ChatModel struct {
	m     *kvrecall.Model
	cfg   Config
	tools []kvrecall.Tool
}

var _ model.ToolCallingChatModel = (*ChatModel)(nil)

// New wraps an open model. The ChatModel does not own it: close the model
// yourself when done.
func New(m *kvrecall.Model, cfg Config) (*ChatModel, error) {
	if m == nil {
		return nil, errors.New("kveino: nil model")
	}
	if cfg.Budget < 0 || cfg.MaxTokens < 0 || cfg.StreamBuffer < 0 {
		return nil, fmt.Errorf("kveino: Config has a negative Budget (%d), MaxTokens (%d) or StreamBuffer (%d)", cfg.Budget, cfg.MaxTokens, cfg.StreamBuffer)
	}
	if cfg.StreamBuffer == 0 {
		cfg.StreamBuffer = 16
	}
	return &ChatModel{m: m, cfg: cfg}, nil
}

// WithTools returns a copy of the model that offers tools; the receiver
// keeps its own (ReAct agents bind tools this way).
func (c *ChatModel) WithTools(tools []*schema.ToolInfo) (model.ToolCallingChatModel, error) {
	ts, err := convertTools(tools)
	if err != nil {
		return nil, err
	}
	cp := *c
	cp.tools = ts
	return &cp, nil
}

// Options are this package's per-call options (model.WrapImplSpecificOptFn).
type Options struct {
	Document string
	Method   string
	Budget   *int
	Format   json.RawMessage
	Sampling *kvrecall.Sampling
}

// WithDocument answers the call after the document ingested under id
// (kvrecall.Model.Ingest): its pages are reused, not prefilled again, so
// an agent can ask a long document many questions. The messages are
// rendered with the chat template (without BOS) after the document; the
// usage's PromptTokenDetails.CachedTokens counts the document's tokens.
func WithDocument(id string) model.Option {
	return model.WrapImplSpecificOptFn(func(o *Options) { o.Document = id })
}

// WithMethod sets the call's paging method ("retro", "quest", "dense",
// "retro+heads", ...).
func WithMethod(method string) model.Option {
	return model.WrapImplSpecificOptFn(func(o *Options) { o.Method = method })
}

// WithBudget sets the tokens each query attends to under the method.
func WithBudget(tokens int) model.Option {
	return model.WrapImplSpecificOptFn(func(o *Options) { o.Budget = &tokens })
}

// WithFormat constrains the answer with llama.cpp's grammar sampler to a
// JSON Schema, or to any JSON object with json.RawMessage(`"json"`).
func WithFormat(schema json.RawMessage) model.Option {
	return model.WrapImplSpecificOptFn(func(o *Options) { o.Format = schema })
}

// WithSampling sets the whole sampling (top-k, min-p, seed, repeat
// penalty, ...); eino's Temperature and TopP options override its fields.
func WithSampling(s kvrecall.Sampling) model.Option {
	return model.WrapImplSpecificOptFn(func(o *Options) { o.Sampling = &s })
}

// Generate answers input with the model's chat template. Tool calls come
// back whole in the message's ToolCalls; a call to an unknown tool or
// malformed call JSON is an error wrapping kvrecall.ErrToolCall that
// quotes what the model wrote.
func (c *ChatModel) Generate(ctx context.Context, input []*schema.Message, opts ...model.Option) (*schema.Message, error) {
	msgs, o, err := c.prepare(input, opts)
	if err != nil {
		return nil, err
	}
	res, err := c.m.Chat(ctx, msgs, o)
	if err != nil {
		return nil, fmt.Errorf("kvrecall: %w", err)
	}
	return message(res, res.Text), nil
}

// Stream is Generate as eino's stream: a chunk per piece of text, then a
// last chunk with the tool calls and ResponseMeta (FinishReason, Usage).
// Closing the reader stops generation at the next token. An error during
// generation is the stream's last item.
func (c *ChatModel) Stream(ctx context.Context, input []*schema.Message, opts ...model.Option) (*schema.StreamReader[*schema.Message], error) {
	msgs, o, err := c.prepare(input, opts)
	if err != nil {
		return nil, err
	}
	sr, sw := schema.Pipe[*schema.Message](c.cfg.StreamBuffer)
	go func() {
		defer sw.Close()
		defer func() {
			if p := recover(); p != nil {
				sw.Send(nil, fmt.Errorf("kvrecall: panic during generation: %v", p))
			}
		}()
		closed := false
		o.OnToken = func(t kvrecall.Token) error {
			if t.Text == "" {
				return nil
			}
			if sw.Send(&schema.Message{Role: schema.Assistant, Content: t.Text}, nil) {
				closed = true
				return errReaderClosed
			}
			return nil
		}
		res, err := c.m.Chat(ctx, msgs, o)
		switch {
		case closed:
		case err != nil:
			sw.Send(nil, fmt.Errorf("kvrecall: %w", err))
		default:
			// The text went out in the chunks; the last carries what
			// only the end knows.
			sw.Send(message(res, ""), nil)
		}
	}()
	return sr, nil
}

var errReaderClosed = errors.New("kveino: the stream's reader was closed")

// prepare maps eino's messages and options onto a kvrecall call.
func (c *ChatModel) prepare(input []*schema.Message, opts []model.Option) ([]kvrecall.Message, kvrecall.GenerateOptions, error) {
	common := model.GetCommonOptions(&model.Options{}, opts...)
	own := model.GetImplSpecificOptions(&Options{}, opts...)
	o := kvrecall.GenerateOptions{Document: c.cfg.Document, Method: c.cfg.Method, Budget: c.cfg.Budget,
		MaxTokens: c.cfg.MaxTokens, Sampling: c.cfg.Sampling, Tools: c.tools, Stop: common.Stop, Format: own.Format}
	if own.Document != "" {
		o.Document = own.Document
	}
	if own.Method != "" {
		o.Method = own.Method
	}
	if own.Budget != nil {
		o.Budget = *own.Budget
	}
	if own.Sampling != nil {
		o.Sampling = *own.Sampling
	}
	if common.Temperature != nil {
		o.Sampling.Temperature = *common.Temperature
	}
	if common.TopP != nil {
		o.Sampling.TopP = *common.TopP
	}
	if common.MaxTokens != nil {
		o.MaxTokens = *common.MaxTokens
	}
	if common.Tools != nil {
		ts, err := convertTools(common.Tools)
		if err != nil {
			return nil, o, err
		}
		o.Tools = ts
	}
	if common.ToolChoice != nil {
		var err error
		if o.Tools, o.ToolChoice, err = toolChoice(*common.ToolChoice, common.AllowedToolNames, o.Tools); err != nil {
			return nil, o, err
		}
	}
	msgs, err := convertMessages(input)
	return msgs, o, err
}

// toolChoice maps eino's choice onto OpenAI's, which kvrecall takes.
// AllowedToolNames narrows the tools a forced call may use.
func toolChoice(tc schema.ToolChoice, allowed []string, tools []kvrecall.Tool) ([]kvrecall.Tool, string, error) {
	switch tc {
	case schema.ToolChoiceForbidden:
		return tools, "none", nil
	case schema.ToolChoiceAllowed:
		return tools, "auto", nil
	case schema.ToolChoiceForced:
	default:
		return nil, "", fmt.Errorf("kveino: tool choice %q (forbidden, allowed or forced)", tc)
	}
	if len(allowed) == 0 {
		return tools, "required", nil
	}
	var keep []kvrecall.Tool
	for _, name := range allowed {
		i := slices.IndexFunc(tools, func(t kvrecall.Tool) bool { return t.Name == name })
		if i < 0 {
			return nil, "", fmt.Errorf("kveino: allowed tool %q is not among the tools offered", name)
		}
		keep = append(keep, tools[i])
	}
	if len(keep) == 1 {
		// Offer every tool (the template lists them) but force this one.
		return tools, keep[0].Name, nil
	}
	return keep, "required", nil
}

func convertTools(infos []*schema.ToolInfo) ([]kvrecall.Tool, error) {
	out := make([]kvrecall.Tool, 0, len(infos))
	for i, ti := range infos {
		if ti == nil {
			return nil, fmt.Errorf("kveino: tool %d is nil", i)
		}
		if ti.Name == "" {
			return nil, fmt.Errorf("kveino: tool %d has no name", i)
		}
		t := kvrecall.Tool{Name: ti.Name, Description: ti.Desc}
		if ti.ParamsOneOf != nil {
			s, err := ti.ParamsOneOf.ToJSONSchema()
			if err != nil {
				return nil, fmt.Errorf("kveino: tool %s: parameters: %w", ti.Name, err)
			}
			if s != nil {
				if t.Parameters, err = json.Marshal(s); err != nil {
					return nil, fmt.Errorf("kveino: tool %s: parameters: %w", ti.Name, err)
				}
			}
		}
		out = append(out, t)
	}
	return out, nil
}

// convertMessages maps eino's messages onto chat turns. Multimodal parts
// other than text are errors, not dropped.
func convertMessages(in []*schema.Message) ([]kvrecall.Message, error) {
	out := make([]kvrecall.Message, 0, len(in))
	for i, m := range in {
		if m == nil {
			return nil, fmt.Errorf("kveino: message %d is nil", i)
		}
		var role string
		switch m.Role {
		case schema.System:
			role = "system"
		case schema.User:
			role = "user"
		case schema.Assistant:
			role = "assistant"
		case schema.Tool:
			role = "tool"
		default:
			return nil, fmt.Errorf("kveino: message %d: unknown role %q", i, m.Role)
		}
		content := m.Content
		for j, p := range m.MultiContent {
			if p.Type != schema.ChatMessagePartTypeText {
				return nil, fmt.Errorf("kveino: message %d, part %d: %s parts are not supported (text only)", i, j, p.Type)
			}
			content += p.Text
		}
		for j, p := range m.UserInputMultiContent {
			if p.Type != schema.ChatMessagePartTypeText {
				return nil, fmt.Errorf("kveino: message %d, input part %d: %s parts are not supported (text only)", i, j, p.Type)
			}
			content += p.Text
		}
		for j, p := range m.AssistantGenMultiContent {
			if p.Type != schema.ChatMessagePartTypeText {
				return nil, fmt.Errorf("kveino: message %d, output part %d: %s parts are not supported (text only)", i, j, p.Type)
			}
			content += p.Text
		}
		km := kvrecall.Message{Role: role, Content: content}
		for _, tc := range m.ToolCalls {
			args := json.RawMessage(tc.Function.Arguments)
			if len(args) == 0 {
				args = json.RawMessage("{}")
			}
			if !json.Valid(args) {
				return nil, fmt.Errorf("kveino: message %d: arguments of tool call %s are not JSON: %q", i, tc.Function.Name, tc.Function.Arguments)
			}
			km.ToolCalls = append(km.ToolCalls, kvrecall.ToolCall{Name: tc.Function.Name, Arguments: args})
		}
		out = append(out, km)
	}
	return out, nil
}

var callID atomic.Int64

// message is a response as an assistant message with content text.
func message(res *kvrecall.Response, text string) *schema.Message {
	u := res.Usage
	msg := &schema.Message{Role: schema.Assistant, Content: text,
		ResponseMeta: &schema.ResponseMeta{FinishReason: finishReason(res), Usage: &schema.TokenUsage{
			PromptTokens: u.PromptTokens, PromptTokenDetails: schema.PromptTokenDetails{CachedTokens: u.CachedTokens},
			CompletionTokens: u.CompletionTokens, TotalTokens: u.TotalTokens}},
		Extra: map[string]any{ExtraUsage: u},
	}
	for i, tc := range res.ToolCalls {
		msg.ToolCalls = append(msg.ToolCalls, schema.ToolCall{Index: &i, ID: fmt.Sprintf("call_%d", callID.Add(1)), Type: "function",
			Function: schema.FunctionCall{Name: tc.Name, Arguments: string(tc.Arguments)}})
	}
	return msg
}

// ExtraUsage is the key of a response's kvrecall.Usage in Message.Extra
// (pages retrieved and KV bytes beside the token counts).
const ExtraUsage = "kvrecall_usage"

// finishReason uses OpenAI's finish reasons, which eino's components
// compare against.
func finishReason(res *kvrecall.Response) string {
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
