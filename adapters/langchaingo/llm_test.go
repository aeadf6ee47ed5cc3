package kvlangchaingo_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/tmc/langchaingo/llms"

	"github.com/kvrecall/kvrecall"
	kvlangchaingo "github.com/kvrecall/kvrecall/adapters/langchaingo"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

func open(t *testing.T, path string, ctxLen int) *kvrecall.Model {
	t.Helper()
	m, err := kvrecall.Open(context.Background(), path, kvrecall.Options{Threads: 2, ContextLength: ctxLen, DataDir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func human(s string) []llms.MessageContent {
	return []llms.MessageContent{llms.TextParts(llms.ChatMessageTypeHuman, s)}
}

func info(t *testing.T, c *llms.ContentChoice, key string) int {
	t.Helper()
	v, ok := c.GenerationInfo[key].(int)
	require.True(t, ok, "GenerationInfo[%s] = %v", key, c.GenerationInfo[key])
	return v
}

// Text, streaming, stop words and usage on the pretrained stories model.
func TestGenerateContent(t *testing.T) {
	ctx := context.Background()
	m := open(t, testmodels.StoriesV3(t), 512)
	llm := kvlangchaingo.New(m, kvlangchaingo.Options{})
	var _ llms.Model = llm

	full, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(30))
	require.NoError(t, err)
	require.Len(t, full.Choices, 1)
	c := full.Choices[0]
	require.Contains(t, c.Content, ".", "30 tokens of a story hold a sentence end")
	promptTokens, err := m.CountTokens("Once upon a time")
	require.NoError(t, err)

	t.Run("usage", func(t *testing.T) {
		require.Equal(t, promptTokens+1, info(t, c, "PromptTokens"), "the prompt and BOS")
		require.Equal(t, 30, info(t, c, "CompletionTokens"))
		require.Equal(t, promptTokens+1+30, info(t, c, "TotalTokens"))
		require.Equal(t, 0, info(t, c, "PromptCachedTokens"))
		require.Equal(t, "length", c.StopReason)
	})
	t.Run("streaming", func(t *testing.T) {
		var chunks []string
		res, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(30),
			llms.WithStreamingFunc(func(_ context.Context, b []byte) error { chunks = append(chunks, string(b)); return nil }))
		require.NoError(t, err)
		require.Greater(t, len(chunks), 5, "streamed token by token")
		require.Equal(t, res.Choices[0].Content, strings.Join(chunks, ""))
		require.Equal(t, c.Content, res.Choices[0].Content, "greedy: the same answer as without streaming")
	})
	t.Run("streaming error stops", func(t *testing.T) {
		stop := errors.New("enough")
		n := 0
		_, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(30),
			llms.WithStreamingFunc(func(context.Context, []byte) error { n++; return stop }))
		require.ErrorIs(t, err, stop)
		require.Equal(t, 1, n)
	})
	t.Run("stop words", func(t *testing.T) {
		res, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(30), llms.WithStopWords([]string{"."}))
		require.NoError(t, err)
		want, _, _ := strings.Cut(c.Content, ".")
		require.Equal(t, want, res.Choices[0].Content)
		require.Equal(t, "stop", res.Choices[0].StopReason)
		require.Less(t, info(t, res.Choices[0], "CompletionTokens"), 30)
	})
	t.Run("call", func(t *testing.T) {
		s, err := llm.Call(ctx, "Once upon a time", llms.WithMaxTokens(30))
		require.NoError(t, err)
		require.Equal(t, c.Content, s)
	})
	t.Run("json mode", func(t *testing.T) {
		// In JSON mode strings are unbounded and this model writes a story
		// into one until the limit: what is checked is that the grammar
		// shaped the answer into an object (WithFormat's schema bounds it).
		res, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(40), llms.WithJSONMode())
		require.NoError(t, err)
		out := strings.TrimSpace(res.Choices[0].Content)
		require.True(t, strings.HasPrefix(out, `{ "`) || strings.HasPrefix(out, `{"`), "%q", out)
		require.False(t, strings.HasPrefix(strings.TrimSpace(c.Content), "{"), "without the grammar the answer is a story")
	})
	t.Run("format", func(t *testing.T) {
		schema := json.RawMessage(`{"type":"object","properties":{"name":{"type":"string","maxLength":10},"age":{"type":"integer","minimum":1,"maximum":9}},"required":["name","age"],"additionalProperties":false}`)
		res, err := llm.GenerateContent(ctx, human("Once upon a time"), llms.WithMaxTokens(100), kvlangchaingo.WithFormat(schema))
		require.NoError(t, err)
		var v struct {
			Name string `json:"name"`
			Age  int    `json:"age"`
		}
		dec := json.NewDecoder(strings.NewReader(res.Choices[0].Content))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&v), "%q", res.Choices[0].Content)
		require.LessOrEqual(t, len(v.Name), 10)
		require.True(t, v.Age >= 1 && v.Age <= 9, "age %d", v.Age)
	})
}

// Tools reach the chat template; a forced call comes back whole as a
// tool call; the model's bad calls and bad settings are errors.
func TestTools(t *testing.T) {
	const tpl = `{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}
{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}`
	ctx := context.Background()
	m := open(t, testmodels.StoriesWithTemplate(t, tpl), 512)
	llm := kvlangchaingo.New(m, kvlangchaingo.Options{})
	weather := llms.Tool{Type: "function", Function: &llms.FunctionDefinition{Name: "get_weather", Description: "Weather in a city",
		Parameters: map[string]any{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string", "maxLength": 12}},
			"required": []string{"city"}, "additionalProperties": false}}}
	clock := llms.Tool{Type: "function", Function: &llms.FunctionDefinition{Name: "get_time"}}
	tools := []llms.Tool{weather, clock}
	msgs := human("Once upon a time")

	t.Run("tools reach the template", func(t *testing.T) {
		res, err := llm.GenerateContent(ctx, msgs, llms.WithMaxTokens(4), llms.WithTools(tools))
		require.NoError(t, err)
		p, err := m.ChatPrompt([]kvrecall.Message{{Role: "user", Content: "Once upon a time"}},
			[]kvrecall.Tool{{Name: "get_weather"}, {Name: "get_time"}}, false)
		require.NoError(t, err)
		require.Equal(t, "Tools: get_weather get_time\nOnce upon a time", p)
		n, err := m.CountTokens(p)
		require.NoError(t, err)
		require.Equal(t, n+1, info(t, res.Choices[0], "PromptTokens"), "the prompt with the tools, and BOS")
		require.Empty(t, res.Choices[0].ToolCalls)
	})
	for _, c := range []struct {
		name   string
		choice any
	}{
		{"llms.ToolChoice", llms.ToolChoice{Type: "function", Function: &llms.FunctionReference{Name: "get_weather"}}},
		{"name", "get_weather"},
		{"map", map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}},
	} {
		t.Run("forced call via "+c.name, func(t *testing.T) {
			var streamed strings.Builder
			res, err := llm.GenerateContent(ctx, msgs, llms.WithMaxTokens(200), llms.WithTools(tools), llms.WithToolChoice(c.choice),
				llms.WithStreamingFunc(func(_ context.Context, b []byte) error { streamed.Write(b); return nil }))
			require.NoError(t, err)
			ch := res.Choices[0]
			require.Len(t, ch.ToolCalls, 1)
			tc := ch.ToolCalls[0]
			require.Equal(t, "function", tc.Type)
			require.NotEmpty(t, tc.ID)
			require.Equal(t, "get_weather", tc.FunctionCall.Name)
			var args struct {
				City string `json:"city"`
			}
			dec := json.NewDecoder(strings.NewReader(tc.FunctionCall.Arguments))
			dec.DisallowUnknownFields()
			require.NoError(t, dec.Decode(&args), tc.FunctionCall.Arguments)
			require.Equal(t, tc.FunctionCall, ch.FuncCall, "the legacy field for function agents")
			require.Equal(t, "tool_calls", ch.StopReason)
			require.Empty(t, ch.Content)
			require.Empty(t, streamed.String(), "no fragment of the call is streamed")
		})
	}
	t.Run("a tool answer goes back to the model", func(t *testing.T) {
		history := append(human("Once upon a time"),
			llms.MessageContent{Role: llms.ChatMessageTypeAI, Parts: []llms.ContentPart{llms.ToolCall{ID: "call_1", Type: "function",
				FunctionCall: &llms.FunctionCall{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}},
			llms.MessageContent{Role: llms.ChatMessageTypeTool, Parts: []llms.ContentPart{llms.ToolCallResponse{ToolCallID: "call_1", Name: "get_weather", Content: " it was sunny"}}})
		res, err := llm.GenerateContent(ctx, history, llms.WithMaxTokens(4), llms.WithTools(tools))
		require.NoError(t, err)
		n, err := m.CountTokens("Tools: get_weather get_time\nOnce upon a time it was sunny")
		require.NoError(t, err)
		require.Equal(t, n+1, info(t, res.Choices[0], "PromptTokens"), "the tool's answer is in the prompt")
	})

	bad := []struct {
		name string
		opts []llms.CallOption
		msgs []llms.MessageContent
		want string
		is   error
	}{
		{"unknown tool in the answer", []llms.CallOption{llms.WithTools(tools), llms.WithMaxTokens(40),
			kvlangchaingo.WithFormat(json.RawMessage(`{"type":"object","properties":{"name":{"const":"rm_rf"},"arguments":{"type":"object","properties":{},"additionalProperties":false}},"required":["name","arguments"],"additionalProperties":false}`))},
			nil, `unknown tool "rm_rf"`, kvrecall.ErrToolCall},
		{"arguments that are not an object", []llms.CallOption{llms.WithTools(tools), llms.WithMaxTokens(40),
			kvlangchaingo.WithFormat(json.RawMessage(`{"type":"object","properties":{"name":{"const":"get_time"},"arguments":{"type":"integer","minimum":1,"maximum":9}},"required":["name","arguments"],"additionalProperties":false}`))},
			nil, "not a JSON object", kvrecall.ErrToolCall},
		{"call cut off", []llms.CallOption{llms.WithTools(tools), llms.WithToolChoice("required"), llms.WithMaxTokens(3)},
			nil, "cut off", kvrecall.ErrToolCall},
		{"call cut off inside its JSON", []llms.CallOption{llms.WithTools(tools), llms.WithToolChoice("get_weather"), llms.WithMaxTokens(30)},
			nil, "cut off (stop reason length)", kvrecall.ErrToolCall},
		{"schema the grammar cannot handle", []llms.CallOption{llms.WithTools([]llms.Tool{{Type: "function", Function: &llms.FunctionDefinition{
			Name: "f", Parameters: map[string]any{"type": "int"}}}}), llms.WithToolChoice("f")},
			nil, "unknown type int", kvrecall.ErrFormat},
		{"bad format", []llms.CallOption{kvlangchaingo.WithFormat(json.RawMessage(`{"type":"int"}`))}, nil, "unknown type int", kvrecall.ErrFormat},
		{"unknown tool choice", []llms.CallOption{llms.WithTools(tools), llms.WithToolChoice("get_wether")}, nil, `"get_wether"`, nil},
		{"tool choice of a bad type", []llms.CallOption{llms.WithTools(tools), llms.WithToolChoice(42)}, nil, "ToolChoice of type int", nil},
		{"non-function tool", []llms.CallOption{llms.WithTools([]llms.Tool{{Type: "retrieval"}})}, nil, `type "retrieval"`, nil},
		{"parameters that are not JSON", []llms.CallOption{llms.WithTools([]llms.Tool{{Type: "function", Function: &llms.FunctionDefinition{
			Name: "f", Parameters: "{nope"}}})}, nil, "not JSON", nil},
		{"candidates", []llms.CallOption{llms.WithCandidateCount(2)}, nil, "CandidateCount 2", nil},
		{"presence penalty", []llms.CallOption{llms.WithPresencePenalty(0.5)}, nil, "PresencePenalty", nil},
		{"image part", nil, []llms.MessageContent{{Role: llms.ChatMessageTypeHuman, Parts: []llms.ContentPart{llms.ImageURLPart("http://x/y.png")}}},
			"ImageURLContent parts are not supported", nil},
		{"bad tool call in the history", nil, []llms.MessageContent{{Role: llms.ChatMessageTypeAI, Parts: []llms.ContentPart{
			llms.ToolCall{ID: "c", FunctionCall: &llms.FunctionCall{Name: "f", Arguments: "{oops"}}}}}, "not JSON", nil},
		{"unknown document", []llms.CallOption{kvlangchaingo.WithDocument("nope")}, nil, "nope", kvrecall.ErrNoDocument},
		{"document id of a bad type", []llms.CallOption{llms.WithMetadata(map[string]any{kvlangchaingo.MetaDocument: 7})}, nil, "not a document id", nil},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			in := c.msgs
			if in == nil {
				in = msgs
			}
			_, err := llm.GenerateContent(ctx, in, c.opts...)
			require.ErrorContains(t, err, c.want)
			if c.is != nil {
				require.ErrorIs(t, err, c.is)
			}
		})
	}
}

// A document is prefilled once; calls naming it (per call, or as the
// LLM's default) answer from its pages: usage shows every document token
// reused and only the question evaluated.
func TestDocument(t *testing.T) {
	ctx := context.Background()
	path := testmodels.Recall(t)
	const length = 2048
	m := open(t, path, length+64)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(length, []float64{0.25, 0.75}, 11)
	require.NoError(t, err)
	words := func(ids []int32) string {
		s, err := m.Detokenize(ids)
		require.NoError(t, err)
		return strings.TrimPrefix(s, " ")
	}
	prefilled := 0
	doc, err := m.Ingest(ctx, "hay", words(c.Tokens[1:]), kvrecall.IngestOptions{Progress: func(done, _ int) { prefilled = done }})
	require.NoError(t, err)
	require.Equal(t, length, prefilled)
	docTokens := doc.Info().Tokens
	require.Equal(t, length, docTokens)

	perCall := kvlangchaingo.New(m, kvlangchaingo.Options{})
	bound := kvlangchaingo.New(m, kvlangchaingo.Options{Document: "hay", Method: "retro", Budget: 512})
	for i, n := range c.Needles {
		q := words(voc.Question(n))
		qTokens, err := m.CountTokens(q)
		require.NoError(t, err)
		for name, call := range map[string]func() (*llms.ContentResponse, error){
			"per call": func() (*llms.ContentResponse, error) {
				return perCall.GenerateContent(ctx, human(q), llms.WithMaxTokens(voc.AnswerLength),
					kvlangchaingo.WithDocument("hay"), kvlangchaingo.WithMethod("retro"), kvlangchaingo.WithBudget(512))
			},
			"bound": func() (*llms.ContentResponse, error) {
				return bound.GenerateContent(ctx, human(q), llms.WithMaxTokens(voc.AnswerLength))
			},
		} {
			t.Run(fmt.Sprintf("needle %d %s", i, name), func(t *testing.T) {
				res, err := call()
				require.NoError(t, err)
				ch := res.Choices[0]
				require.Equal(t, " "+words(n.Values), ch.Content, "needle %d", i)
				require.Equal(t, docTokens, info(t, ch, "PromptCachedTokens"), "the whole document reused")
				require.Equal(t, docTokens+qTokens, info(t, ch, "PromptTokens"), "only the question evaluated")
				require.Positive(t, info(t, ch, "PagesRetrieved"))
			})
		}
	}
}
