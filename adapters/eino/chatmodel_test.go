package kveino_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/cloudwego/eino/components/model"
	"github.com/cloudwego/eino/components/tool"
	"github.com/cloudwego/eino/components/tool/utils"
	"github.com/cloudwego/eino/compose"
	"github.com/cloudwego/eino/flow/agent/react"
	"github.com/cloudwego/eino/schema"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	kveino "github.com/kvrecall/kvrecall/adapters/eino"
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

func newModel(t *testing.T, m *kvrecall.Model, cfg kveino.Config) *kveino.ChatModel {
	t.Helper()
	cm, err := kveino.New(m, cfg)
	require.NoError(t, err)
	return cm
}

// drain reads a stream to its end: the chunks, and the error that ended it.
func drain(t *testing.T, sr *schema.StreamReader[*schema.Message]) ([]*schema.Message, error) {
	t.Helper()
	defer sr.Close()
	var out []*schema.Message
	for {
		m, err := sr.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
}

var user = []*schema.Message{schema.UserMessage("Once upon a time")}

// Text, usage, stop strings and streaming on the pretrained stories model.
func TestGenerateAndStream(t *testing.T) {
	ctx := context.Background()
	m := open(t, testmodels.StoriesV3(t), 512)
	cm := newModel(t, m, kveino.Config{MaxTokens: 30})
	msg, err := cm.Generate(ctx, user)
	require.NoError(t, err)
	require.Equal(t, schema.Assistant, msg.Role)
	require.Contains(t, msg.Content, ".", "30 tokens of a story hold a sentence end")
	n, err := m.CountTokens("Once upon a time")
	require.NoError(t, err)
	u := msg.ResponseMeta.Usage
	require.Equal(t, &schema.TokenUsage{PromptTokens: n + 1, CompletionTokens: 30, TotalTokens: n + 1 + 30}, u)
	require.Equal(t, "length", msg.ResponseMeta.FinishReason)
	ku, ok := msg.Extra[kveino.ExtraUsage].(kvrecall.Usage)
	require.True(t, ok)
	require.Equal(t, u.PromptTokens, ku.PromptTokens)

	t.Run("stream", func(t *testing.T) {
		sr, err := cm.Stream(ctx, user)
		require.NoError(t, err)
		chunks, err := drain(t, sr)
		require.NoError(t, err)
		require.Greater(t, len(chunks), 5, "streamed token by token")
		var text strings.Builder
		for _, c := range chunks[:len(chunks)-1] {
			require.Nil(t, c.ResponseMeta, "usage comes last")
			require.NotEmpty(t, c.Content, "no empty chunks")
			text.WriteString(c.Content)
		}
		last := chunks[len(chunks)-1]
		require.Empty(t, last.Content)
		require.Equal(t, msg.Content, text.String(), "the chunks join to the whole answer")
		require.Equal(t, u, last.ResponseMeta.Usage)
		whole, err := schema.ConcatMessages(chunks)
		require.NoError(t, err)
		require.Equal(t, msg.Content, whole.Content)
		require.Equal(t, u, whole.ResponseMeta.Usage)
		require.Equal(t, "length", whole.ResponseMeta.FinishReason)
	})
	t.Run("stop", func(t *testing.T) {
		res, err := cm.Generate(ctx, user, model.WithStop([]string{"."}))
		require.NoError(t, err)
		want, _, _ := strings.Cut(msg.Content, ".")
		require.Equal(t, want, res.Content)
		require.Equal(t, "stop", res.ResponseMeta.FinishReason)
	})
	t.Run("max tokens", func(t *testing.T) {
		res, err := cm.Generate(ctx, user, model.WithMaxTokens(5))
		require.NoError(t, err)
		require.Equal(t, 5, res.ResponseMeta.Usage.CompletionTokens)
		require.True(t, strings.HasPrefix(msg.Content, res.Content))
	})
	t.Run("closing the reader early leaves the model usable", func(t *testing.T) {
		sr, err := cm.Stream(ctx, user, model.WithMaxTokens(400))
		require.NoError(t, err)
		_, err = sr.Recv()
		require.NoError(t, err)
		sr.Close()
		// The model is free again: a call after it answers as before.
		res, err := cm.Generate(ctx, user)
		require.NoError(t, err)
		require.Equal(t, msg.Content, res.Content)
	})
	t.Run("format", func(t *testing.T) {
		schemaJSON := json.RawMessage(`{"type":"object","properties":{"name":{"type":"string","maxLength":10}},"required":["name"],"additionalProperties":false}`)
		res, err := cm.Generate(ctx, user, kveino.WithFormat(schemaJSON), model.WithMaxTokens(100))
		require.NoError(t, err)
		var v struct {
			Name string `json:"name"`
		}
		dec := json.NewDecoder(strings.NewReader(res.Content))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&v), "%q", res.Content)
	})
}

const toolTemplate = `{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}
{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}`

var weather = &schema.ToolInfo{Name: "get_weather", Desc: "Weather in a city",
	ParamsOneOf: schema.NewParamsOneOfByParams(map[string]*schema.ParameterInfo{
		"city": {Type: schema.String, Desc: "the city", Required: true},
	})}

var clock = &schema.ToolInfo{Name: "get_time", Desc: "The time"}

// WithTools returns a copy that offers the tools to the template; the
// original is unchanged. Forced calls come back whole, first in a stream.
func TestTools(t *testing.T) {
	ctx := context.Background()
	m := open(t, testmodels.StoriesWithTemplate(t, toolTemplate), 512)
	cm := newModel(t, m, kveino.Config{MaxTokens: 4})
	before, err := cm.Generate(ctx, user)
	require.NoError(t, err)

	tcm, err := cm.WithTools([]*schema.ToolInfo{weather, clock})
	require.NoError(t, err)
	require.NotSame(t, cm, tcm)
	with, err := tcm.Generate(ctx, user)
	require.NoError(t, err)
	n, err := m.CountTokens("Tools: get_weather get_time\nOnce upon a time")
	require.NoError(t, err)
	require.Equal(t, n+1, with.ResponseMeta.Usage.PromptTokens, "the copy's tools reach the template")
	after, err := cm.Generate(ctx, user)
	require.NoError(t, err)
	require.Equal(t, before.ResponseMeta.Usage, after.ResponseMeta.Usage, "the original offers no tools")
	require.Less(t, after.ResponseMeta.Usage.PromptTokens, with.ResponseMeta.Usage.PromptTokens)
	// Per-call tools replace the bound ones.
	one, err := cm.Generate(ctx, user, model.WithTools([]*schema.ToolInfo{clock}))
	require.NoError(t, err)
	n1, _ := m.CountTokens("Tools: get_time\nOnce upon a time")
	require.Equal(t, n1+1, one.ResponseMeta.Usage.PromptTokens)

	forced := []model.Option{model.WithToolChoice(schema.ToolChoiceForced, "get_weather"), model.WithMaxTokens(200)}
	t.Run("forced call", func(t *testing.T) {
		msg, err := tcm.Generate(ctx, user, forced...)
		require.NoError(t, err)
		require.Len(t, msg.ToolCalls, 1)
		tc := msg.ToolCalls[0]
		require.Equal(t, "get_weather", tc.Function.Name)
		require.Equal(t, "function", tc.Type)
		require.NotEmpty(t, tc.ID)
		var args struct {
			City string `json:"city"`
		}
		dec := json.NewDecoder(strings.NewReader(tc.Function.Arguments))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&args), tc.Function.Arguments)
		require.Equal(t, "tool_calls", msg.ResponseMeta.FinishReason)
		require.Empty(t, msg.Content)
	})
	t.Run("a streamed call is the first non-empty chunk", func(t *testing.T) {
		sr, err := tcm.Stream(ctx, user, forced...)
		require.NoError(t, err)
		chunks, err := drain(t, sr)
		require.NoError(t, err)
		// eino's ReAct agent decides from the first chunk with content or
		// calls: it must be the call, not a fragment of its JSON.
		var first *schema.Message
		for _, c := range chunks {
			if c.Content != "" || len(c.ToolCalls) > 0 {
				first = c
				break
			}
		}
		require.NotNil(t, first)
		require.Len(t, first.ToolCalls, 1)
		require.Equal(t, "get_weather", first.ToolCalls[0].Function.Name)
		require.True(t, json.Valid([]byte(first.ToolCalls[0].Function.Arguments)))
	})
	t.Run("a tool's answer goes back to the model", func(t *testing.T) {
		in := []*schema.Message{schema.UserMessage("Once upon a time"),
			schema.AssistantMessage("", []schema.ToolCall{{ID: "c1", Type: "function", Function: schema.FunctionCall{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}),
			schema.ToolMessage(" it was sunny", "c1", schema.WithToolName("get_weather"))}
		msg, err := tcm.Generate(ctx, in)
		require.NoError(t, err)
		n, _ := m.CountTokens("Tools: get_weather get_time\nOnce upon a time it was sunny")
		require.Equal(t, n+1, msg.ResponseMeta.Usage.PromptTokens)
	})

	bad := []struct {
		name  string
		model model.BaseChatModel
		in    []*schema.Message
		opts  []model.Option
		want  string
		is    error
	}{
		{"unknown tool in the answer", tcm, user, []model.Option{model.WithMaxTokens(40),
			kveino.WithFormat(json.RawMessage(`{"type":"object","properties":{"name":{"const":"rm_rf"},"arguments":{"type":"object","properties":{},"additionalProperties":false}},"required":["name","arguments"],"additionalProperties":false}`))},
			`unknown tool "rm_rf"`, kvrecall.ErrToolCall},
		{"arguments that are not an object", tcm, user, []model.Option{model.WithMaxTokens(40),
			kveino.WithFormat(json.RawMessage(`{"type":"object","properties":{"name":{"const":"get_time"},"arguments":{"type":"integer","minimum":1,"maximum":9}},"required":["name","arguments"],"additionalProperties":false}`))},
			"not a JSON object", kvrecall.ErrToolCall},
		{"call cut off", tcm, user, []model.Option{model.WithToolChoice(schema.ToolChoiceForced, "get_weather"), model.WithMaxTokens(30)},
			"cut off (stop reason length)", kvrecall.ErrToolCall},
		{"schema the grammar cannot handle", cm, user, []model.Option{model.WithTools([]*schema.ToolInfo{{Name: "f",
			ParamsOneOf: schema.NewParamsOneOfByParams(map[string]*schema.ParameterInfo{"x": {Type: "int"}})}}),
			model.WithToolChoice(schema.ToolChoiceForced)}, "unknown type int", kvrecall.ErrFormat},
		{"bad format", cm, user, []model.Option{kveino.WithFormat(json.RawMessage(`{"type":"int"}`))}, "unknown type int", kvrecall.ErrFormat},
		{"allowed tool not offered", tcm, user, []model.Option{model.WithToolChoice(schema.ToolChoiceForced, "get_wether")}, `"get_wether" is not among`, nil},
		{"forced without tools", cm, user, []model.Option{model.WithToolChoice(schema.ToolChoiceForced)}, "needs tools", nil},
		{"bad tool choice", tcm, user, []model.Option{model.WithToolChoice("sometimes")}, `"sometimes"`, nil},
		{"image part", cm, []*schema.Message{{Role: schema.User, UserInputMultiContent: []schema.MessageInputPart{{Type: schema.ChatMessagePartTypeImageURL}}}},
			nil, "image_url parts are not supported", nil},
		{"bad role", cm, []*schema.Message{{Role: "robot", Content: "x"}}, nil, `unknown role "robot"`, nil},
		{"bad arguments in the history", cm, []*schema.Message{schema.AssistantMessage("", []schema.ToolCall{{Function: schema.FunctionCall{Name: "f", Arguments: "{oops"}}})},
			nil, "not JSON", nil},
		{"unknown document", cm, user, []model.Option{kveino.WithDocument("nope")}, "nope", kvrecall.ErrNoDocument},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			_, err := c.model.Generate(ctx, c.in, c.opts...)
			require.ErrorContains(t, err, c.want)
			if c.is != nil {
				require.ErrorIs(t, err, c.is)
			}
			// Stream gives the same error, as the call's error or the
			// stream's last item.
			sr, err := c.model.Stream(ctx, c.in, c.opts...)
			if err == nil {
				_, err = drain(t, sr)
			}
			require.ErrorContains(t, err, c.want)
		})
	}
	_, err = cm.WithTools([]*schema.ToolInfo{{Desc: "no name"}})
	require.ErrorContains(t, err, "has no name")
	_, err = kveino.New(m, kveino.Config{Budget: -1})
	require.ErrorContains(t, err, "negative")
}

// eino's ReAct agent binds the tools with WithTools, reads the streamed
// call, runs the tool and returns its result (ToolReturnDirectly).
func TestReactAgent(t *testing.T) {
	ctx := context.Background()
	m := open(t, testmodels.StoriesWithTemplate(t, toolTemplate), 512)
	cm := newModel(t, m, kveino.Config{MaxTokens: 200})
	var got string
	weatherTool, err := utils.InferTool("get_weather", "Weather in a city", func(_ context.Context, in struct {
		City string `json:"city" jsonschema:"required"`
	}) (string, error) {
		got = in.City
		return "sunny in " + in.City, nil
	})
	require.NoError(t, err)
	ag, err := react.NewAgent(ctx, &react.AgentConfig{ToolCallingModel: cm,
		ToolsConfig:        compose.ToolsNodeConfig{Tools: []tool.BaseTool{weatherTool}},
		ToolReturnDirectly: map[string]struct{}{"get_weather": {}}, MaxStep: 4})
	require.NoError(t, err)
	forced := react.WithChatModelOptions(model.WithToolChoice(schema.ToolChoiceForced))
	for _, streamed := range []bool{false, true} {
		t.Run(fmt.Sprint("streamed ", streamed), func(t *testing.T) {
			got = ""
			var out *schema.Message
			if streamed {
				sr, err := ag.Stream(ctx, user, forced)
				require.NoError(t, err)
				chunks, err := drain(t, sr)
				require.NoError(t, err)
				out, err = schema.ConcatMessages(chunks)
				require.NoError(t, err)
			} else {
				out, err = ag.Generate(ctx, user, forced)
				require.NoError(t, err)
			}
			require.NotEmpty(t, got, "the tool ran")
			require.Equal(t, schema.Tool, out.Role)
			require.Equal(t, "sunny in "+got, out.Content)
		})
	}
	// The agent's model keeps no tools of its own.
	msg, err := cm.Generate(ctx, user, model.WithMaxTokens(4))
	require.NoError(t, err)
	n, _ := m.CountTokens("Once upon a time")
	require.Equal(t, n+1, msg.ResponseMeta.Usage.PromptTokens)
}

// A document is prefilled once; calls naming it answer from its pages:
// usage shows every document token reused and only the question evaluated.
func TestDocument(t *testing.T) {
	ctx := context.Background()
	path := testmodels.Recall(t)
	const length = 2048
	m := open(t, path, length+64)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(length, []float64{0.3, 0.6, 0.9}, 5)
	require.NoError(t, err)
	words := func(ids []int32) string {
		s, err := m.Detokenize(ids)
		require.NoError(t, err)
		return strings.TrimPrefix(s, " ")
	}
	doc, err := m.Ingest(ctx, "hay", words(c.Tokens[1:]), kvrecall.IngestOptions{})
	require.NoError(t, err)
	docTokens := doc.Info().Tokens
	require.Equal(t, length, docTokens)

	cm := newModel(t, m, kveino.Config{MaxTokens: voc.AnswerLength})
	for i, n := range c.Needles {
		q := words(voc.Question(n))
		qTokens, err := m.CountTokens(q)
		require.NoError(t, err)
		opts := []model.Option{kveino.WithDocument("hay"), kveino.WithMethod("retro"), kveino.WithBudget(512)}
		t.Run(fmt.Sprint("needle ", i), func(t *testing.T) {
			msg, err := cm.Generate(ctx, []*schema.Message{schema.UserMessage(q)}, opts...)
			require.NoError(t, err)
			require.Equal(t, " "+words(n.Values), msg.Content)
			want := &schema.TokenUsage{PromptTokens: docTokens + qTokens, PromptTokenDetails: schema.PromptTokenDetails{CachedTokens: docTokens},
				CompletionTokens: voc.AnswerLength, TotalTokens: docTokens + qTokens + voc.AnswerLength}
			require.Equal(t, want, msg.ResponseMeta.Usage, "the document reused, only the question evaluated")
			require.Positive(t, msg.Extra[kveino.ExtraUsage].(kvrecall.Usage).PagesRetrieved)

			sr, err := cm.Stream(ctx, []*schema.Message{schema.UserMessage(q)}, opts...)
			require.NoError(t, err)
			chunks, err := drain(t, sr)
			require.NoError(t, err)
			whole, err := schema.ConcatMessages(chunks)
			require.NoError(t, err)
			require.Equal(t, msg.Content, whole.Content)
			require.Equal(t, want, whole.ResponseMeta.Usage)
		})
	}
	// A model bound to the document answers the same without the option.
	bound := newModel(t, m, kveino.Config{Document: "hay", Method: "retro", Budget: 512, MaxTokens: voc.AnswerLength})
	msg, err := bound.Generate(ctx, []*schema.Message{schema.UserMessage(words(voc.Question(c.Needles[0])))})
	require.NoError(t, err)
	require.Equal(t, " "+words(c.Needles[0].Values), msg.Content)
	require.Equal(t, docTokens, msg.ResponseMeta.Usage.PromptTokenDetails.CachedTokens)
}
