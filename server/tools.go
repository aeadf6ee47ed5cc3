package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kvrecall/kvrecall/internal/chat"
	"github.com/kvrecall/kvrecall/runtime"
)

// Tools, tool choices and output formats as OpenAI's and Ollama's chat
// routes take them. Both list tools the same way: [{"type": "function",
// "function": {"name", "description", "parameters"}}]. Every mistake is a
// 400 that names the field, found before the request takes a slot.

// parseTools reads a request's tools (absent or null: none).
func parseTools(raw json.RawMessage) ([]chat.Tool, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var list []json.RawMessage
	if raw[0] != '[' || json.Unmarshal(raw, &list) != nil {
		return nil, badRequest(`tools must be an array of {"type": "function", "function": {"name": ..., "parameters": {...}}}`)
	}
	tools := make([]chat.Tool, len(list))
	seen := map[string]bool{}
	for i, item := range list {
		var t struct {
			Type     string          `json:"type"`
			Function json.RawMessage `json:"function"`
		}
		if err := json.Unmarshal(item, &t); err != nil {
			return nil, badRequest("tools[%d] must be an object: %v", i, err)
		}
		if t.Type != "function" {
			return nil, badRequest(`tools[%d].type must be "function" (got %q)`, i, t.Type)
		}
		var fn struct {
			Name        *string         `json:"name"`
			Description string          `json:"description"`
			Parameters  json.RawMessage `json:"parameters"`
		}
		if err := json.Unmarshal(t.Function, &fn); err != nil || len(t.Function) == 0 {
			return nil, badRequest("tools[%d].function must be an object with a name", i)
		}
		if fn.Name == nil || *fn.Name == "" {
			return nil, badRequest("tools[%d].function.name must be a non-empty string", i)
		}
		if seen[*fn.Name] {
			return nil, badRequest("tools[%d].function.name %q is given twice", i, *fn.Name)
		}
		seen[*fn.Name] = true
		params := bytes.TrimSpace(fn.Parameters)
		if string(params) == "null" {
			params = nil
		}
		if len(params) > 0 {
			if params[0] != '{' {
				return nil, badRequest("tools[%d].function.parameters must be a JSON Schema object", i)
			}
			// A schema the grammar converter refuses would only fail when
			// the call is forced; say so now, for every tool.
			if _, err := runtime.FormatGrammar(params); err != nil {
				return nil, badRequest("tools[%d].function.parameters: %v", i, err)
			}
		}
		tools[i] = chat.Tool{Name: *fn.Name, Description: fn.Description, Parameters: params}
	}
	return tools, nil
}

// parseToolChoice reads OpenAI's tool_choice: "none", "auto", "required"
// or {"type": "function", "function": {"name": ...}}; "" when absent.
func parseToolChoice(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	const want = `tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}`
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "none", "auto", "required":
			return s, nil
		}
		return "", badRequest("%s (got %q)", want, s)
	}
	var o struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if json.Unmarshal(raw, &o) != nil || o.Type != "function" || o.Function.Name == "" {
		return "", badRequest("%s (got %s)", want, clipJSON(raw))
	}
	return o.Function.Name, nil
}

// parseResponseFormat reads OpenAI's response_format into Ollama's format
// (nil, `"json"` or a schema): {"type": "text"}, {"type": "json_object"}
// or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}.
func parseResponseFormat(raw json.RawMessage) (json.RawMessage, string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, "", nil
	}
	var rf struct {
		Type       *string `json:"type"`
		JSONSchema *struct {
			Name   string          `json:"name"`
			Schema json.RawMessage `json:"schema"`
		} `json:"json_schema"`
	}
	if err := json.Unmarshal(raw, &rf); err != nil || rf.Type == nil {
		return nil, "", badRequest(`response_format must be an object with a type ("text", "json_object" or "json_schema")`)
	}
	switch *rf.Type {
	case "text":
		return nil, "", nil
	case "json_object":
		return json.RawMessage(`"json"`), "response_format", nil
	case "json_schema":
		if rf.JSONSchema == nil || len(bytes.TrimSpace(rf.JSONSchema.Schema)) == 0 {
			return nil, "", badRequest(`response_format.json_schema.schema is required with type "json_schema"`)
		}
		s := bytes.TrimSpace(rf.JSONSchema.Schema)
		if s[0] != '{' {
			return nil, "", badRequest("response_format.json_schema.schema must be a JSON Schema object (got %s)", clipJSON(s))
		}
		return s, "response_format.json_schema.schema", nil
	}
	return nil, "", badRequest(`response_format.type must be "text", "json_object" or "json_schema" (got %q)`, *rf.Type)
}

func clipJSON(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "..."
	}
	return string(b)
}

// chatConstraints resolves a chat request's tools, tool choice and output
// format into the tools to offer the template and the grammar to sample
// under. field names the format's field in errors.
func chatConstraints(tools []chat.Tool, choice, choiceField string, format json.RawMessage, field string) ([]chat.Tool, string, bool, error) {
	offered, forced, err := chat.ToolChoice(tools, choice)
	if err != nil {
		return nil, "", false, badRequest("%s: %v", choiceField, err)
	}
	if forced != nil {
		if g, _ := runtime.FormatGrammar(format); g != "" {
			return nil, "", false, badRequest("%s %q forces a tool call, which cannot also follow %s", choiceField, choice, field)
		}
		format, field = forced, choiceField
	}
	g, err := runtime.FormatGrammar(format)
	if err != nil {
		return nil, "", false, badRequest("%s: %v", field, err)
	}
	return offered, g, forced != nil, nil
}

// toolStream holds back the text of tool calls while an answer streams
// (clients, and agents that decide "call or text" from the first chunk,
// never see a call's fragments) and parses the calls at the end.
type toolStream struct {
	tools  []chat.Tool
	forced bool // the tool choice forced a call
	filter *chat.ToolFilter
}

func newToolStream(tools []chat.Tool, forced bool) *toolStream {
	return &toolStream{tools: tools, forced: forced, filter: chat.NewToolFilter(tools)}
}

// wrap filters what onToken receives; nil stays nil.
func (t *toolStream) wrap(onToken func(runtime.Token) error) func(runtime.Token) error {
	if onToken == nil || len(t.tools) == 0 {
		return onToken
	}
	return func(tok runtime.Token) error {
		if s := t.filter.Add(tok.Text); s != "" {
			return onToken(runtime.Token{ID: tok.ID, Text: s})
		}
		return nil
	}
}

// finish releases the text still held back (to onToken, if streaming) and
// splits the answer into its text and calls. A call the model wrote that
// cannot be used (unknown tool, malformed JSON, cut off by the token
// limit) is an error that says so, never dropped.
func (t *toolStream) finish(res *runtime.Result, onToken func(runtime.Token) error) (string, []chat.ToolCall, error) {
	if len(t.tools) == 0 {
		return res.Text, nil, nil
	}
	// Under a forced call every byte is the call's: what the filter holds
	// at the end is a cut-off call, never text to release.
	if rest := t.filter.Flush(); rest != "" && onToken != nil && !t.forced {
		if err := onToken(runtime.Token{ID: -1, Text: rest}); err != nil {
			return "", nil, err
		}
	}
	content, calls, err := chat.ParseToolCalls(res.Text, t.tools)
	if err == nil && t.forced {
		err = chat.CheckForced(res.Text, calls, "finish_reason "+finishReason(res.StopReason))
	}
	if err != nil {
		return "", nil, fmt.Errorf("the model's answer: %w", err)
	}
	return content, calls, nil
}

// openaiToolCalls renders calls as OpenAI's message.tool_calls (arguments
// as a JSON string); index is set for streamed deltas.
func openaiToolCalls(calls []chat.ToolCall, withIndex bool) []any {
	out := make([]any, len(calls))
	for i, c := range calls {
		tc := map[string]any{"id": newID("call_"), "type": "function",
			"function": map[string]any{"name": c.Name, "arguments": string(c.Arguments)}}
		if withIndex {
			tc["index"] = i
		}
		out[i] = tc
	}
	return out
}

// openaiMessage is a chat message as OpenAI sends it: an assistant turn
// may carry tool_calls (arguments as a JSON string), a tool turn answers
// one (tool_call_id). content may be null next to tool_calls.
type openaiMessage struct {
	Role      string  `json:"role"`
	Content   *string `json:"-"` // read by UnmarshalJSON
	ToolCalls []struct {
		ID       string `json:"id"`
		Type     string `json:"type"`
		Function struct {
			Name      string          `json:"name"`
			Arguments json.RawMessage `json:"arguments"`
		} `json:"function"`
	} `json:"tool_calls"`
	ToolCallID string `json:"tool_call_id"`
}

func (m *openaiMessage) UnmarshalJSON(b []byte) error {
	type plain openaiMessage
	var p struct {
		plain
		Content json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*m = openaiMessage(p.plain)
	c := bytes.TrimSpace(p.Content)
	switch {
	case len(c) == 0 || string(c) == "null":
	case c[0] == '"':
		var s string
		if err := json.Unmarshal(c, &s); err != nil {
			return err
		}
		m.Content = &s
	case c[0] == '[':
		// Content parts: the text parts, joined (images are not supported).
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if err := json.Unmarshal(c, &parts); err != nil {
			return fmt.Errorf("content parts: %w", err)
		}
		var sb strings.Builder
		for _, pt := range parts {
			if pt.Type != "text" {
				return fmt.Errorf("content part of type %q is not supported (only text)", pt.Type)
			}
			sb.WriteString(pt.Text)
		}
		s := sb.String()
		m.Content = &s
	default:
		return fmt.Errorf("content must be a string, an array of text parts or null")
	}
	return nil
}

// chatMessages converts OpenAI's messages for the template.
func chatMessages(in []openaiMessage) ([]chat.Message, error) {
	out := make([]chat.Message, len(in))
	for i, m := range in {
		out[i] = chat.Message{Role: m.Role}
		if m.Content != nil {
			out[i].Content = *m.Content
		}
		for j, tc := range m.ToolCalls {
			args := bytes.TrimSpace(tc.Function.Arguments)
			if len(args) > 0 && args[0] == '"' {
				var s string
				if err := json.Unmarshal(args, &s); err != nil {
					return nil, badRequest("messages[%d].tool_calls[%d].function.arguments: %v", i, j, err)
				}
				args = []byte(s)
			}
			if len(args) == 0 {
				args = []byte("{}")
			}
			if !json.Valid(args) {
				return nil, badRequest("messages[%d].tool_calls[%d].function.arguments must be JSON", i, j)
			}
			if tc.Function.Name == "" {
				return nil, badRequest("messages[%d].tool_calls[%d].function.name is missing", i, j)
			}
			out[i].ToolCalls = append(out[i].ToolCalls, chat.ToolCall{Name: tc.Function.Name, Arguments: args})
		}
	}
	return out, nil
}
