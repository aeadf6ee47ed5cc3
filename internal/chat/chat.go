// Package chat turns chat messages into a prompt with a model's chat
// template (tokenizer.chat_template, Jinja through gonja). The server and
// the kvrecall library both use it, so that a library caller gets exactly
// the prompt an HTTP client would.
package chat

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nikolalohinski/gonja/v2"
	"github.com/nikolalohinski/gonja/v2/exec"

	"github.com/kvrecall/kvrecall/runtime"
)

// Message is one chat turn (OpenAI and Ollama use the same two fields).
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
	// ToolCalls are an assistant turn's calls, given back to the template
	// as OpenAI's tool_calls (not read from the server's JSON).
	ToolCalls []ToolCall `json:"-"`
}

// Template renders chat messages into a prompt with the model's
// tokenizer.chat_template. Models without one get the fallback: the
// messages' contents joined by blank lines, which the model continues (it
// suits base models such as the recall model). A Template is immutable
// and safe for concurrent use.
type Template struct {
	tpl *exec.Template
	// named is the Ollama chat format used instead when gonja cannot parse
	// the source (named.go); tpl is nil then.
	named    *named
	source   string
	bos, eos string
}

// New parses a Jinja chat template; source "" gives the fallback. bos and
// eos are the texts of the model's BOS and EOS tokens (bos_token and
// eos_token in the template).
func New(source, bos, eos string) (*Template, error) {
	c := &Template{source: source, bos: bos, eos: eos}
	if source == "" {
		return c, nil
	}
	tpl, err := gonja.FromString(source)
	if err != nil {
		n, nerr := newNamed(source)
		if nerr != nil {
			return nil, fmt.Errorf("the model's chat template does not parse (%w), and it matches none of Ollama's chat formats (%v)", err, nerr)
		}
		c.named = n
		return c, nil
	}
	c.tpl = tpl
	return c, nil
}

// ForModel returns the template a model's GGUF metadata records.
func ForModel(m *runtime.Model) (*Template, error) {
	f := m.File()
	tok := m.Tokenizer()
	var bos, eos string
	if id, ok := f.Uint("tokenizer.ggml.bos_token_id"); ok && int(id) < tok.Size() {
		bos = tok.Piece(int32(id))
	}
	if id, ok := f.Uint("tokenizer.ggml.eos_token_id"); ok && int(id) < tok.Size() {
		eos = tok.Piece(int32(id))
	}
	return New(f.String("tokenizer.chat_template"), bos, eos)
}

// Fallback is the documented format used when a model has no chat template.
const Fallback = "contents joined by blank lines"

// HasTemplate reports whether the model has a chat template (false: the
// fallback is used).
func (c *Template) HasTemplate() bool { return c.tpl != nil || c.named != nil }

// Format names the Ollama chat format standing in for a template gonja
// cannot parse ("gemma3-instruct"); "" when the model's own template (or
// the fallback) is used.
func (c *Template) Format() string {
	if c.named == nil {
		return ""
	}
	return c.named.name
}

// Source is the template's Jinja text ("" for the fallback).
func (c *Template) Source() string { return c.source }

// Render returns the prompt for msgs, ending where the assistant's reply
// starts. withBOS=false leaves the BOS token out (a document already has it).
func (c *Template) Render(msgs []Message, withBOS bool) (string, error) {
	return c.RenderTools(msgs, nil, withBOS)
}

// RenderTools is Render with tools the model may call, handed to the
// template as `tools` (the models' own templates describe them in the
// system turn). A model without a template cannot be offered tools.
func (c *Template) RenderTools(msgs []Message, tools []Tool, withBOS bool) (string, error) {
	if len(msgs) == 0 {
		return "", errors.New("messages must not be empty")
	}
	for _, m := range msgs {
		switch m.Role {
		case "system", "user", "assistant", "tool":
		default:
			return "", fmt.Errorf("unknown message role %q (system, user, assistant, tool)", m.Role)
		}
	}
	if c.named != nil {
		out, err := c.named.render(msgs, tools)
		if err == nil && withBOS && c.bos != "" && !strings.HasPrefix(out, c.bos) {
			out = c.bos + out // Ollama's formats leave BOS to the tokenizer
		}
		return out, err
	}
	if c.tpl == nil && len(tools) > 0 {
		return "", errors.New("the model has no chat template to offer tools with")
	}
	if c.tpl == nil {
		parts := make([]string, len(msgs))
		for i, m := range msgs {
			parts[i] = m.Content
		}
		return strings.Join(parts, "\n\n"), nil
	}
	list := make([]any, len(msgs))
	for i, m := range msgs {
		mm := map[string]any{"role": m.Role, "content": m.Content}
		if len(m.ToolCalls) > 0 {
			calls := make([]any, len(m.ToolCalls))
			for j, tc := range m.ToolCalls {
				var args any
				if err := json.Unmarshal(tc.Arguments, &args); err != nil {
					return "", fmt.Errorf("message %d, tool call %s: arguments are not JSON: %w", i, tc.Name, err)
				}
				calls[j] = map[string]any{"type": "function", "function": map[string]any{"name": tc.Name, "arguments": args}}
			}
			mm["tool_calls"] = calls
		}
		list[i] = mm
	}
	bos := c.bos
	if !withBOS {
		bos = ""
	}
	vars := map[string]any{
		"messages":              list,
		"add_generation_prompt": true,
		"bos_token":             bos,
		"eos_token":             c.eos,
		"raise_exception": func(msg string) (string, error) {
			return "", errors.New(msg)
		},
	}
	if len(tools) > 0 {
		tt, err := templateTools(tools)
		if err != nil {
			return "", err
		}
		vars["tools"] = tt
	}
	ctx := exec.NewContext(vars)
	out, err := c.tpl.ExecuteToString(ctx)
	if err != nil {
		return "", fmt.Errorf("chat template: %w", err)
	}
	return out, nil
}

// StartsWithBOS reports whether a rendered prompt already holds the BOS
// text (then the prompt is tokenized without adding another).
func (c *Template) StartsWithBOS(prompt string) bool {
	return c.bos != "" && strings.HasPrefix(prompt, c.bos)
}
