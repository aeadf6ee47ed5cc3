package chat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Tool is a function the model may call: what the chat template lists
// (as OpenAI's {"type": "function", "function": {...}}) and what tool calls
// in the output are checked against.
type Tool struct {
	Name        string
	Description string
	// Parameters is the JSON Schema of the arguments (nil: none given).
	Parameters json.RawMessage
}

// ToolCall is one call the model made, parsed whole from its output.
type ToolCall struct {
	Name      string
	Arguments json.RawMessage // a JSON object
}

// ErrToolCall marks a tool call the model wrote that cannot be used: an
// unknown tool, malformed JSON, an unterminated <tool_call>.
var ErrToolCall = errors.New("bad tool call")

// The formats recognised, as the models' own templates ask for them:
// Hermes/Qwen2.5/Qwen3 wrap each call in <tool_call>...</tool_call>;
// Llama 3.1/3.2 answer with one JSON object {"name", "parameters"}, after
// <|python_tag|> or alone.
const (
	hermesOpen  = "<tool_call>"
	hermesClose = "</tool_call>"
	pythonTag   = "<|python_tag|>"
)

// templateTools is tools as chat templates expect them (HF's
// apply_chat_template(tools=...): OpenAI's function objects).
func templateTools(tools []Tool) ([]any, error) {
	out := make([]any, len(tools))
	for i, t := range tools {
		if t.Name == "" {
			return nil, fmt.Errorf("tool %d has no name", i)
		}
		fn := map[string]any{"name": t.Name, "description": t.Description}
		if len(t.Parameters) > 0 {
			var p any
			if err := json.Unmarshal(t.Parameters, &p); err != nil {
				return nil, fmt.Errorf("tool %s: parameters are not JSON: %w", t.Name, err)
			}
			fn["parameters"] = p
		}
		out[i] = map[string]any{"type": "function", "function": fn}
	}
	return out, nil
}

// ParseToolCalls splits a model's answer into its text and its tool calls.
// With no tools nothing is parsed. Calls to tools not in the list,
// malformed JSON and an unterminated <tool_call> are errors (wrapping
// ErrToolCall) that say what the model wrote; nothing is dropped silently.
func ParseToolCalls(text string, tools []Tool) (string, []ToolCall, error) {
	if len(tools) == 0 {
		return text, nil, nil
	}
	if body, ok := llamaCall(text); ok {
		c, err := parseCall(body, tools)
		if err != nil {
			return "", nil, err
		}
		return "", []ToolCall{c}, nil
	}
	var content strings.Builder
	var calls []ToolCall
	rest := text
	for {
		i := strings.Index(rest, hermesOpen)
		if i < 0 {
			content.WriteString(rest)
			break
		}
		content.WriteString(rest[:i])
		rest = rest[i+len(hermesOpen):]
		j := strings.Index(rest, hermesClose)
		if j < 0 {
			return "", nil, fmt.Errorf("%w: %s without %s (the answer ended inside the call: raise the token limit?): %q", ErrToolCall, hermesOpen, hermesClose, clip(rest))
		}
		c, err := parseCall(rest[:j], tools)
		if err != nil {
			return "", nil, err
		}
		calls = append(calls, c)
		rest = rest[j+len(hermesClose):]
	}
	return strings.TrimSpace(content.String()), calls, nil
}

// llamaCall reports whether the whole answer is a Llama 3 JSON call and
// returns its JSON.
func llamaCall(text string) (string, bool) {
	t := strings.TrimSpace(text)
	if s, ok := strings.CutPrefix(t, pythonTag); ok {
		return strings.TrimSpace(s), true
	}
	// A bare JSON object naming a function: Llama 3's "JSON based tool
	// calling". Other JSON answers stay text.
	if strings.HasPrefix(t, "{") && strings.Contains(t, `"name"`) && (strings.Contains(t, `"parameters"`) || strings.Contains(t, `"arguments"`)) {
		return t, true
	}
	return "", false
}

// parseCall reads {"name": ..., "arguments"|"parameters": {...}}.
func parseCall(body string, tools []Tool) (ToolCall, error) {
	var raw struct {
		Name       string          `json:"name"`
		Arguments  json.RawMessage `json:"arguments"`
		Parameters json.RawMessage `json:"parameters"`
	}
	dec := json.NewDecoder(strings.NewReader(body))
	if err := dec.Decode(&raw); err != nil {
		return ToolCall{}, fmt.Errorf("%w: malformed JSON (%v): %q", ErrToolCall, err, clip(body))
	}
	if dec.More() {
		return ToolCall{}, fmt.Errorf("%w: text after the call's JSON object: %q", ErrToolCall, clip(body))
	}
	if raw.Name == "" {
		return ToolCall{}, fmt.Errorf("%w: the call names no tool: %q", ErrToolCall, clip(body))
	}
	if !slices.ContainsFunc(tools, func(t Tool) bool { return t.Name == raw.Name }) {
		names := make([]string, len(tools))
		for i, t := range tools {
			names[i] = t.Name
		}
		return ToolCall{}, fmt.Errorf("%w: the model called unknown tool %q (tools: %s)", ErrToolCall, raw.Name, strings.Join(names, ", "))
	}
	args := raw.Arguments
	if len(args) == 0 {
		args = raw.Parameters
	}
	args = bytes.TrimSpace(args)
	if len(args) == 0 || string(args) == "null" {
		args = json.RawMessage("{}")
	}
	if args[0] == '"' {
		// Some models write the arguments as a JSON string holding JSON.
		var s string
		if err := json.Unmarshal(args, &s); err == nil && json.Valid([]byte(s)) {
			args = json.RawMessage(s)
		}
	}
	if args[0] != '{' {
		return ToolCall{}, fmt.Errorf("%w: the arguments of %s are not a JSON object: %s", ErrToolCall, raw.Name, clip(string(args)))
	}
	return ToolCall{Name: raw.Name, Arguments: args}, nil
}

func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

// ToolFilter streams an answer's text while holding back everything that
// is or may become a tool call, so that callers never see a call's
// fragments (and agents that decide "tool call or text" from the first
// chunk are not misled): the calls come whole from ParseToolCalls at the
// end. With no tools it passes text through.
type ToolFilter struct {
	tools   bool
	pending string
	inCall  bool // inside <tool_call> ... </tool_call>
	whole   bool // the answer is a Llama 3 JSON call: hold everything
	started bool // text other than white space has been released
}

// NewToolFilter returns a filter for an answer to a request with tools.
func NewToolFilter(tools []Tool) *ToolFilter { return &ToolFilter{tools: len(tools) > 0} }

// Add takes the next piece of the answer and returns the text that is
// safe to release.
func (f *ToolFilter) Add(piece string) string {
	if !f.tools {
		return piece
	}
	f.pending += piece
	var out strings.Builder
	for {
		if f.whole {
			return out.String()
		}
		if f.inCall {
			j := strings.Index(f.pending, hermesClose)
			if j < 0 {
				return out.String()
			}
			f.pending, f.inCall = f.pending[j+len(hermesClose):], false
			continue
		}
		if !f.started {
			t := strings.TrimLeft(f.pending, " \t\r\n")
			switch {
			case t == "":
				return out.String() // only white space so far
			case strings.HasPrefix(t, "{"), strings.HasPrefix(t, pythonTag):
				f.whole = true
				continue
			case strings.HasPrefix(pythonTag, t):
				return out.String() // may still become <|python_tag|>
			}
		}
		if i := strings.Index(f.pending, hermesOpen); i >= 0 {
			f.release(&out, f.pending[:i])
			f.pending, f.inCall = f.pending[i+len(hermesOpen):], true
			continue
		}
		hold := 0
		for k := min(len(hermesOpen)-1, len(f.pending)); k > 0; k-- {
			if strings.HasSuffix(f.pending, hermesOpen[:k]) {
				hold = k
				break
			}
		}
		f.release(&out, f.pending[:len(f.pending)-hold])
		f.pending = f.pending[len(f.pending)-hold:]
		return out.String()
	}
}

func (f *ToolFilter) release(out *strings.Builder, s string) {
	if strings.TrimSpace(s) != "" {
		f.started = true
	}
	out.WriteString(s)
}

// Flush returns the text still held at the end of the answer that is not
// part of a tool call (a "<tool_" that never became one).
func (f *ToolFilter) Flush() string {
	if !f.tools || f.inCall {
		return ""
	}
	if f.whole {
		if _, ok := llamaCall(f.pending); ok {
			return ""
		}
		// JSON that names no function: an answer, released whole.
	}
	out := f.pending
	f.pending = ""
	return out
}

// ToolChoice applies a tool choice as OpenAI defines them to a request's
// tools. It returns the tools to offer the model and, when the choice
// forces a call, the JSON Schema the answer must follow (nil otherwise):
//   - "" or "auto": the model chooses; all tools are offered.
//   - "none": no call; no tools are offered.
//   - "required": a call to one of the tools.
//   - a tool's name: a call to that tool.
//
// A forced call is the bare JSON object {"name": ..., "arguments": {...}}
// (the tool's parameter schema constrains the arguments), which
// ParseToolCalls reads as a call whatever the model's own call format.
func ToolChoice(tools []Tool, choice string) ([]Tool, json.RawMessage, error) {
	switch choice {
	case "", "auto":
		return tools, nil, nil
	case "none":
		return nil, nil, nil
	}
	if len(tools) == 0 {
		return nil, nil, fmt.Errorf("tool choice %q needs tools", choice)
	}
	forced := tools
	if choice != "required" {
		i := slices.IndexFunc(tools, func(t Tool) bool { return t.Name == choice })
		if i < 0 {
			names := make([]string, len(tools))
			for j, t := range tools {
				names[j] = t.Name
			}
			return nil, nil, fmt.Errorf(`tool choice %q is none of "auto", "none", "required" or a tool's name (tools: %s)`, choice, strings.Join(names, ", "))
		}
		forced = tools[i : i+1]
	}
	// Structs, not maps, keep "name" before "arguments": the grammar
	// follows the schema's property order, and a model writes the name
	// more reliably first.
	type nameSchema struct {
		Const string `json:"const"`
	}
	type props struct {
		Name      nameSchema      `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	}
	type call struct {
		Type                 string   `json:"type"`
		Properties           props    `json:"properties"`
		Required             []string `json:"required"`
		AdditionalProperties bool     `json:"additionalProperties"`
	}
	alts := make([]call, len(forced))
	for i, t := range forced {
		// A tool that declares no parameters takes none: {} (a free
		// object would let the model write keys until the token limit).
		args := json.RawMessage(`{"type":"object","properties":{},"additionalProperties":false}`)
		if len(t.Parameters) > 0 {
			if !json.Valid(t.Parameters) {
				return nil, nil, fmt.Errorf("tool %s: parameters are not JSON", t.Name)
			}
			args = t.Parameters
		}
		alts[i] = call{Type: "object", Properties: props{Name: nameSchema{t.Name}, Arguments: args},
			Required: []string{"name", "arguments"}}
	}
	var schema any = alts[0]
	if len(alts) > 1 {
		schema = map[string]any{"anyOf": alts}
	}
	b, err := json.Marshal(schema)
	return tools, b, err
}

// CheckForced is the check of an answer generated under a forced tool
// choice: the grammar allows only a call, so an answer without one was cut
// off by the token limit (or a stop string) before the call was complete.
func CheckForced(text string, calls []ToolCall, stop string) error {
	if len(calls) > 0 {
		return nil
	}
	return fmt.Errorf("%w: the forced tool call was cut off (%s) before it was complete: %q; raise the token limit", ErrToolCall, stop, clip(text))
}
