package chat

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/ollama/ollama/api"
	ollamatemplate "github.com/ollama/ollama/template"
)

// A GGUF's Jinja chat template that gonja cannot parse (Gemma 3's puts an
// inline if inside parentheses: `(first_user_prefix if loop.first else
// "")`) is matched, as Ollama does when it imports a GGUF, to the closest
// of the chat formats Ollama ships as Go templates (template.Named:
// Levenshtein distance under 100 to the Jinja text those formats were
// written from). Only a template that neither parses nor matches is
// refused.
type named struct {
	name string
	tpl  *ollamatemplate.Template
}

func newNamed(source string) (*named, error) {
	n, err := ollamatemplate.Named(source)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(n.Reader())
	if err != nil {
		return nil, err
	}
	t, err := ollamatemplate.Parse(string(b))
	if err != nil {
		return nil, fmt.Errorf("ollama's %s template: %w", n.Name, err)
	}
	return &named{name: n.Name, tpl: t}, nil
}

// render runs the Go template on msgs and tools, in ollama's types; it
// ends where the assistant's reply starts, as every template of Ollama's
// set does for a last user turn.
func (n *named) render(msgs []Message, tools []Tool) (string, error) {
	ms := make([]api.Message, len(msgs))
	for i, m := range msgs {
		ms[i] = api.Message{Role: m.Role, Content: m.Content}
		for _, tc := range m.ToolCalls {
			var call api.ToolCall
			js := fmt.Sprintf(`{"function":{"name":%q,"arguments":%s}}`, tc.Name, tc.Arguments)
			if err := json.Unmarshal([]byte(js), &call); err != nil {
				return "", fmt.Errorf("message %d, tool call %s: arguments are not a JSON object: %w", i, tc.Name, err)
			}
			ms[i].ToolCalls = append(ms[i].ToolCalls, call)
		}
	}
	var ts api.Tools
	if len(tools) > 0 {
		tt, err := templateTools(tools)
		if err != nil {
			return "", err
		}
		b, err := json.Marshal(tt)
		if err != nil {
			return "", err
		}
		if err := json.Unmarshal(b, &ts); err != nil {
			return "", fmt.Errorf("tools: %w", err)
		}
	}
	var sb strings.Builder
	if err := n.tpl.Execute(&sb, ollamatemplate.Values{Messages: ms, Tools: ts}); err != nil {
		return "", fmt.Errorf("chat template (ollama's %s): %w", n.name, err)
	}
	return sb.String(), nil
}
