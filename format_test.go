package kvrecall_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// storiesWithTemplate is the stories model with a minimal chat template
// that lists the tools, so that Chat can offer them.
func storiesWithTemplate(t *testing.T) *kvrecall.Model {
	t.Helper()
	const tpl = `{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}
{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}`
	path := testmodels.StoriesWithTemplate(t, tpl)
	m, err := kvrecall.Open(context.Background(), path, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// A schema-constrained answer from a model that only writes stories
// decodes into the schema's Go type, in every mode (Generate, Chat,
// Document.Ask, greedy and sampled); the same call without Format gives
// prose that does not. Bad formats are errors naming the field.
func TestGenerateFormat(t *testing.T) {
	m := storiesWithTemplate(t)
	ctx := context.Background()
	schema := json.RawMessage(`{"type":"object","properties":{
		"hero":{"type":"string","minLength":1,"maxLength":10},
		"happy":{"type":"boolean"}},"required":["hero","happy"],"additionalProperties":false}`)
	valid := func(text string) error {
		var v struct {
			Hero  *string `json:"hero"`
			Happy *bool   `json:"happy"`
		}
		dec := json.NewDecoder(strings.NewReader(text))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&v); err != nil {
			return err
		}
		if v.Hero == nil || v.Happy == nil || len([]rune(*v.Hero)) < 1 || len([]rune(*v.Hero)) > 10 {
			return &json.UnsupportedValueError{Str: text}
		}
		return nil
	}
	doc, err := m.Ingest(ctx, "story", "Once upon a time, there was a little girl named Lily. She loved to play outside.", kvrecall.IngestOptions{})
	require.NoError(t, err)
	calls := map[string]func(kvrecall.GenerateOptions) (*kvrecall.Response, error){
		"generate": func(o kvrecall.GenerateOptions) (*kvrecall.Response, error) {
			return m.Generate(ctx, "Once upon a time", o)
		},
		"chat": func(o kvrecall.GenerateOptions) (*kvrecall.Response, error) {
			return m.Chat(ctx, []kvrecall.Message{{Role: "user", Content: "Once upon a time"}}, o)
		},
		"ask": func(o kvrecall.GenerateOptions) (*kvrecall.Response, error) {
			return doc.Ask(ctx, " The girl was", o)
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			for seed := -1; seed < 3; seed++ {
				sm := kvrecall.Sampling{} // greedy, then sampled
				if seed >= 0 {
					sm = kvrecall.Sampling{Temperature: 1, Seed: seed}
				}
				res, err := call(kvrecall.GenerateOptions{MaxTokens: 100, Sampling: sm, Format: schema})
				require.NoError(t, err)
				require.Equal(t, kvrecall.StopEOG, res.StopReason, "%q", res.Text)
				require.NoError(t, valid(res.Text), "sampling %+v", sm)

				free, err := call(kvrecall.GenerateOptions{MaxTokens: 40, Sampling: sm})
				require.NoError(t, err)
				require.Error(t, valid(free.Text), "without Format: %q", free.Text)
			}
		})
	}

	for _, tc := range []struct{ name, format, err string }{
		{"unknown name", `"yaml"`, `must be "json" or a JSON Schema object`},
		{"not JSON", `{"type":`, "not valid JSON"},
		{"unknown type", `{"type":"object","properties":{"n":{"type":"int"}}}`, "properties.n.type: unknown type int"},
	} {
		t.Run("bad "+tc.name, func(t *testing.T) {
			_, err := m.Generate(ctx, "Once", kvrecall.GenerateOptions{Format: json.RawMessage(tc.format)})
			require.ErrorIs(t, err, kvrecall.ErrFormat)
			require.ErrorContains(t, err, "GenerateOptions.Format")
			require.ErrorContains(t, err, tc.err)
		})
	}
}

// A forced tool choice makes a model that has never seen a tool call one:
// the grammar writes {"name", "arguments"} with the tool's schema, and
// the call comes back parsed, never streamed as text. "none" and "auto"
// leave the answer free; bad choices are errors.
func TestToolChoice(t *testing.T) {
	m := storiesWithTemplate(t)
	ctx := context.Background()
	tools := []kvrecall.Tool{
		{Name: "get_weather", Parameters: json.RawMessage(`{"type":"object","properties":{"city":{"type":"string","minLength":1,"maxLength":12}},"required":["city"],"additionalProperties":false}`)},
		{Name: "get_time"},
	}
	msgs := []kvrecall.Message{{Role: "user", Content: "Once upon a time"}}
	for _, tc := range []struct {
		choice string
		calls  []string // the tools the answer may call; nil: no call
	}{
		{"get_weather", []string{"get_weather"}},
		{"get_time", []string{"get_time"}},
		{"required", []string{"get_weather", "get_time"}},
		{"auto", nil},
		{"none", nil},
	} {
		t.Run(tc.choice, func(t *testing.T) {
			for seed := -1; seed < 3; seed++ {
				sm := kvrecall.Sampling{}
				if seed >= 0 {
					sm = kvrecall.Sampling{Temperature: 1, Seed: seed}
				}
				var streamed strings.Builder
				res, err := m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: 160, Sampling: sm, Tools: tools, ToolChoice: tc.choice,
					OnToken: func(tk kvrecall.Token) error { streamed.WriteString(tk.Text); return nil }})
				require.NoError(t, err)
				if tc.calls == nil {
					require.Empty(t, res.ToolCalls)
					require.NotEmpty(t, res.Text)
					continue
				}
				require.Len(t, res.ToolCalls, 1, "%q", res.Text)
				c := res.ToolCalls[0]
				require.Contains(t, tc.calls, c.Name)
				require.Empty(t, res.Text)
				require.Empty(t, strings.TrimSpace(streamed.String()), "a call is never streamed as text")
				if c.Name == "get_weather" {
					var args struct {
						City string `json:"city"`
					}
					dec := json.NewDecoder(strings.NewReader(string(c.Arguments)))
					dec.DisallowUnknownFields()
					require.NoError(t, dec.Decode(&args), "%s", c.Arguments)
					require.NotEmpty(t, args.City)
				} else {
					require.JSONEq(t, `{}`, string(c.Arguments), "a tool without parameters takes none")
				}
			}
		})
	}
	// A forced call cut off by MaxTokens is an error, not text.
	var streamed strings.Builder
	res, err := m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: 6, Tools: tools, ToolChoice: "get_weather",
		OnToken: func(tk kvrecall.Token) error { streamed.WriteString(tk.Text); return nil }})
	require.ErrorIs(t, err, kvrecall.ErrToolCall)
	require.Empty(t, streamed.String(), "no fragment of the call is streamed")
	require.ErrorContains(t, err, "the forced tool call was cut off (stop reason length)")
	require.Equal(t, kvrecall.StopLength, res.StopReason)

	// "none" offers no tools: the template lists none.
	p, err := m.ChatPrompt(msgs, nil, false)
	require.NoError(t, err)
	require.NotContains(t, p, "Tools:")

	for _, tc := range []struct {
		name string
		opts kvrecall.GenerateOptions
		err  string
	}{
		{"unknown tool", kvrecall.GenerateOptions{Tools: tools, ToolChoice: "get_news"}, `tool choice "get_news" is none of`},
		{"choice without tools", kvrecall.GenerateOptions{ToolChoice: "required"}, "needs tools"},
		{"forced call and format", kvrecall.GenerateOptions{Tools: tools, ToolChoice: "required", Format: json.RawMessage(`"json"`)}, "cannot also follow GenerateOptions.Format"},
	} {
		t.Run("bad "+tc.name, func(t *testing.T) {
			_, err := m.Chat(ctx, msgs, tc.opts)
			require.ErrorContains(t, err, "GenerateOptions.ToolChoice")
			require.ErrorContains(t, err, tc.err)
		})
	}
	_, err = m.Generate(ctx, "Once", kvrecall.GenerateOptions{ToolChoice: "auto"})
	require.ErrorContains(t, err, "use Chat")
}
