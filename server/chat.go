package server

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nikolalohinski/gonja/v2"
	"github.com/nikolalohinski/gonja/v2/exec"

	"github.com/kvrecall/kvrecall/runtime"
)

// message is one chat turn (OpenAI and Ollama use the same two fields).
type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// chatTemplate renders chat messages into a prompt with the model's
// tokenizer.chat_template (Jinja, through gonja). Models without one get the
// fallback: the messages' contents joined by blank lines, which the model
// continues (it suits base models such as the recall model).
type chatTemplate struct {
	tpl      *exec.Template
	source   string
	bos, eos string
}

func newChatTemplate(m *runtime.Model) (*chatTemplate, error) {
	f := m.File()
	c := &chatTemplate{source: f.String("tokenizer.chat_template")}
	tok := m.Tokenizer()
	if id, ok := f.Uint("tokenizer.ggml.bos_token_id"); ok && int(id) < tok.Size() {
		c.bos = tok.Piece(int32(id))
	}
	if id, ok := f.Uint("tokenizer.ggml.eos_token_id"); ok && int(id) < tok.Size() {
		c.eos = tok.Piece(int32(id))
	}
	if c.source == "" {
		return c, nil
	}
	tpl, err := gonja.FromString(c.source)
	if err != nil {
		return nil, fmt.Errorf("the model's chat template does not parse: %w", err)
	}
	c.tpl = tpl
	return c, nil
}

// Fallback is the documented format used when a model has no chat template.
const Fallback = "contents joined by blank lines"

// render returns the prompt for msgs, ending where the assistant's reply
// starts. withBOS=false leaves the BOS token out (a document already has it).
func (c *chatTemplate) render(msgs []message, withBOS bool) (string, error) {
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
	if c.tpl == nil {
		parts := make([]string, len(msgs))
		for i, m := range msgs {
			parts[i] = m.Content
		}
		return strings.Join(parts, "\n\n"), nil
	}
	list := make([]any, len(msgs))
	for i, m := range msgs {
		list[i] = map[string]any{"role": m.Role, "content": m.Content}
	}
	bos := c.bos
	if !withBOS {
		bos = ""
	}
	ctx := exec.NewContext(map[string]any{
		"messages":              list,
		"add_generation_prompt": true,
		"bos_token":             bos,
		"eos_token":             c.eos,
		"raise_exception": func(msg string) (string, error) {
			return "", errors.New(msg)
		},
	})
	out, err := c.tpl.ExecuteToString(ctx)
	if err != nil {
		return "", fmt.Errorf("chat template: %w", err)
	}
	return out, nil
}

// startsWithBOS reports whether a rendered prompt already holds the BOS text.
func (c *chatTemplate) startsWithBOS(prompt string) bool {
	return c.bos != "" && strings.HasPrefix(prompt, c.bos)
}
