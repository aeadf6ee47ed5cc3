package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// newStoriesFixture serves the tiny pretrained stories model with a chat
// template that lists the tools: a model that writes children's stories
// and has never seen a tool call or JSON, so that any call or JSON in its
// answers comes from the grammar.
func newStoriesFixture(t *testing.T) *fixture {
	t.Helper()
	const tpl = `{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}
{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}`
	path := testmodels.StoriesWithTemplate(t, tpl)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(m.Close)
	s := New(Config{ModelName: "stories"})
	require.NoError(t, s.SetModel(m, time.Second))
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return &fixture{t: t, m: m, s: s, ts: ts}
}

var (
	weatherTool = map[string]any{"type": "function", "function": map[string]any{
		"name": "get_weather", "description": "Weather in a city",
		"parameters": json.RawMessage(`{"type":"object","properties":{"city":{"type":"string","minLength":1,"maxLength":12}},"required":["city"],"additionalProperties":false}`)}}
	timeTool   = map[string]any{"type": "function", "function": map[string]any{"name": "get_time"}}
	storyMsgs  = []map[string]any{{"role": "user", "content": "Once upon a time"}}
	heroSchema = json.RawMessage(`{"type":"object","properties":{"hero":{"type":"string","minLength":1,"maxLength":10},"age":{"type":"integer","minimum":1,"maximum":9}},"required":["hero","age"],"additionalProperties":false}`)
)

// validHero checks an answer against heroSchema.
func validHero(text string) error {
	var v struct {
		Hero *string `json:"hero"`
		Age  *int    `json:"age"`
	}
	dec := json.NewDecoder(strings.NewReader(text))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return err
	}
	if v.Hero == nil || v.Age == nil || len([]rune(*v.Hero)) < 1 || len([]rune(*v.Hero)) > 10 || *v.Age < 1 || *v.Age > 9 {
		return io.ErrUnexpectedEOF
	}
	return nil
}

func TestToolAndFormatBadInput(t *testing.T) {
	fx := newStoriesFixture(t)
	chatBody := func(kv ...any) map[string]any {
		return with(map[string]any{"messages": storyMsgs, "max_tokens": 4}, kv...)
	}
	ollamaBody := func(kv ...any) map[string]any {
		return with(map[string]any{"messages": storyMsgs, "stream": false, "options": map[string]any{"num_predict": 4}}, kv...)
	}
	for _, c := range []struct {
		name, path string
		body       map[string]any
		want       string
	}{
		{"tools not an array", "/v1/chat/completions", chatBody("tools", weatherTool), "tools must be an array"},
		{"tools not an array (stream)", "/v1/chat/completions", chatBody("tools", "get_weather", "stream", true), "tools must be an array"},
		{"tool of another type", "/v1/chat/completions", chatBody("tools", []any{map[string]any{"type": "retrieval"}}), `tools[0].type must be "function"`},
		{"tool without a name", "/v1/chat/completions", chatBody("tools", []any{timeTool, map[string]any{"type": "function", "function": map[string]any{"description": "x"}}}), "tools[1].function.name must be a non-empty string"},
		{"tool named twice", "/v1/chat/completions", chatBody("tools", []any{timeTool, timeTool}), `tools[1].function.name "get_time" is given twice`},
		{"tool parameters not a schema", "/v1/chat/completions", chatBody("tools", []any{map[string]any{"type": "function", "function": map[string]any{"name": "f", "parameters": []int{1}}}}), "tools[0].function.parameters must be a JSON Schema object"},
		{"tool parameters bad schema", "/v1/chat/completions", chatBody("tools", []any{map[string]any{"type": "function", "function": map[string]any{"name": "f", "parameters": map[string]any{"type": "int"}}}}), "tools[0].function.parameters: bad output format: schema type: unknown type int"},
		{"unknown tool_choice", "/v1/chat/completions", chatBody("tools", []any{weatherTool}, "tool_choice", "sometimes"), `tool_choice must be "none", "auto", "required"`},
		{"malformed tool_choice", "/v1/chat/completions", chatBody("tools", []any{weatherTool}, "tool_choice", map[string]any{"type": "function"}), `tool_choice must be`},
		{"tool_choice names no tool", "/v1/chat/completions", chatBody("tools", []any{weatherTool}, "tool_choice", map[string]any{"type": "function", "function": map[string]any{"name": "get_news"}}), `tool_choice: tool choice "get_news" is none of`},
		{"tool_choice without tools", "/v1/chat/completions", chatBody("tool_choice", "required"), "tool_choice: tool choice \"required\" needs tools"},
		{"tool_choice and response_format", "/v1/chat/completions", chatBody("tools", []any{weatherTool}, "tool_choice", "required", "response_format", map[string]any{"type": "json_object"}), "cannot also follow response_format"},
		{"response_format not an object", "/v1/chat/completions", chatBody("response_format", "json"), "response_format must be an object with a type"},
		{"unknown response_format type", "/v1/chat/completions", chatBody("response_format", map[string]any{"type": "xml"}), `response_format.type must be "text", "json_object" or "json_schema" (got "xml")`},
		{"json_schema without schema", "/v1/chat/completions", chatBody("response_format", map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "x"}}), "response_format.json_schema.schema is required"},
		{"malformed schema", "/v1/chat/completions", chatBody("response_format", map[string]any{"type": "json_schema", "json_schema": map[string]any{"schema": map[string]any{"type": "object", "properties": map[string]any{"n": map[string]any{"type": "float"}}}}}), "response_format.json_schema.schema: bad output format: schema properties.n.type: unknown type float"},
		{"schema with a remote ref", "/v1/completions", map[string]any{"prompt": "Once", "response_format": map[string]any{"type": "json_schema", "json_schema": map[string]any{"schema": map[string]any{"$ref": "https://x.org/s.json"}}}}, "response_format.json_schema.schema: bad output format: schema $ref: only local references"},
		{"bad tool call arguments in history", "/v1/chat/completions", chatBody("messages", []any{map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{"id": "c1", "type": "function", "function": map[string]any{"name": "get_time", "arguments": "{not json"}}}}}), "messages[0].tool_calls[0].function.arguments must be JSON"},
		{"tools not an array (ollama)", "/api/chat", ollamaBody("tools", weatherTool), "tools must be an array"},
		{"tool without a name (ollama)", "/api/chat", ollamaBody("tools", []any{map[string]any{"type": "function", "function": map[string]any{}}}), "tools[0].function.name must be a non-empty string"},
		{"unknown format (ollama)", "/api/chat", ollamaBody("format", "yaml"), `format: bad output format: must be "json" or a JSON Schema object (got "yaml")`},
		{"malformed schema (ollama)", "/api/chat", ollamaBody("format", map[string]any{"type": "object", "required": "hero"}), "format: bad output format: schema required must be an array"},
		{"malformed schema (ollama generate)", "/api/generate", map[string]any{"prompt": "Once", "format": map[string]any{"type": []any{"string", 3}}}, "format: bad output format: schema type: unknown type 3"},
		{"unknown tool_choice (ollama)", "/api/chat", ollamaBody("tools", []any{weatherTool}, "tool_choice", "get_news"), `tool_choice: tool choice "get_news" is none of`},
	} {
		t.Run(c.name, func(t *testing.T) {
			resp := fx.do("POST", c.path, "", c.body)
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", b)
			var msg string
			if strings.HasPrefix(c.path, "/api/") {
				var e map[string]string
				require.NoError(t, json.Unmarshal(b, &e))
				msg = e["error"]
			} else {
				var e map[string]map[string]any
				require.NoError(t, json.Unmarshal(b, &e))
				msg, _ = e["error"]["message"].(string)
			}
			require.Contains(t, msg, c.want)
		})
	}
}

// openaiChoice is the part of a chat completion the tests read.
type openaiChoice struct {
	FinishReason string `json:"finish_reason"`
	Message      struct {
		Content   *string `json:"content"`
		ToolCalls []struct {
			ID       string `json:"id"`
			Type     string `json:"type"`
			Function struct {
				Name      string `json:"name"`
				Arguments string `json:"arguments"`
			} `json:"function"`
		} `json:"tool_calls"`
	} `json:"message"`
}

// Forced tool calls, free answers with tools offered, and constrained
// JSON, on both APIs, streamed and not. The stories model never writes a
// call or JSON by itself: the "free" rows check that.
func TestToolCallsAndFormats(t *testing.T) {
	fx := newStoriesFixture(t)
	tools := []any{weatherTool, timeTool}
	type answer struct {
		text   string
		calls  map[string]string // name -> arguments (a JSON object)
		finish string
	}
	// openai asks /v1/chat/completions and collects the answer (from the
	// deltas when streaming).
	openai := func(t *testing.T, stream bool, kv ...any) answer {
		body := with(map[string]any{"messages": storyMsgs, "max_tokens": 160, "temperature": 0, "stream": stream}, kv...)
		resp := fx.do("POST", "/v1/chat/completions", "", body)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		a := answer{calls: map[string]string{}}
		if !stream {
			var r struct{ Choices []openaiChoice }
			r = decode[struct{ Choices []openaiChoice }](t, resp)
			c := r.Choices[0]
			if c.Message.Content != nil {
				a.text = *c.Message.Content
			} else {
				require.NotEmpty(t, c.Message.ToolCalls, "content is null only next to tool calls")
			}
			for _, tc := range c.Message.ToolCalls {
				require.Equal(t, "function", tc.Type)
				require.True(t, strings.HasPrefix(tc.ID, "call_"))
				a.calls[tc.Function.Name] = tc.Function.Arguments
			}
			a.finish = c.FinishReason
			return a
		}
		lines := sseLines(t, resp)
		for _, l := range lines[1 : len(lines)-1] {
			var c struct {
				Choices []struct {
					Delta struct {
						Content   string `json:"content"`
						ToolCalls []struct {
							Index    *int `json:"index"`
							Function struct {
								Name      string `json:"name"`
								Arguments string `json:"arguments"`
							} `json:"function"`
						} `json:"tool_calls"`
					} `json:"delta"`
					FinishReason *string `json:"finish_reason"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal([]byte(l), &c))
			d := c.Choices[0]
			if len(d.Delta.ToolCalls) > 0 {
				require.Empty(t, a.calls, "the calls come in one delta")
			}
			require.False(t, d.Delta.Content != "" && len(a.calls) > 0, "no text after the calls")
			a.text += d.Delta.Content
			for _, tc := range d.Delta.ToolCalls {
				require.NotNil(t, tc.Index, "streamed tool calls carry their index")
				a.calls[tc.Function.Name] = tc.Function.Arguments
			}
			if d.FinishReason != nil {
				a.finish = *d.FinishReason
			}
		}
		return a
	}
	ollama := func(t *testing.T, stream bool, kv ...any) answer {
		body := with(map[string]any{"messages": storyMsgs, "stream": stream, "options": map[string]any{"num_predict": 160, "temperature": 0}}, kv...)
		resp := fx.do("POST", "/api/chat", "", body)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		defer resp.Body.Close()
		a := answer{calls: map[string]string{}}
		dec := json.NewDecoder(resp.Body)
		for {
			var line struct {
				Message struct {
					Content   string `json:"content"`
					ToolCalls []struct {
						Function struct {
							Name      string          `json:"name"`
							Arguments json.RawMessage `json:"arguments"`
						} `json:"function"`
					} `json:"tool_calls"`
				} `json:"message"`
				Done       bool   `json:"done"`
				DoneReason string `json:"done_reason"`
			}
			err := dec.Decode(&line)
			if err == io.EOF {
				break
			}
			require.NoError(t, err)
			a.text += line.Message.Content
			for _, tc := range line.Message.ToolCalls {
				a.calls[tc.Function.Name] = string(tc.Function.Arguments)
			}
			if line.Done {
				a.finish = line.DoneReason
			}
		}
		return a
	}
	checkWeather := func(t *testing.T, args string) {
		var v struct {
			City string `json:"city"`
		}
		dec := json.NewDecoder(strings.NewReader(args))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&v), "%s", args)
		require.NotEmpty(t, v.City)
	}
	for _, api := range []struct {
		name string
		ask  func(t *testing.T, stream bool, kv ...any) answer
		// how each API asks for a format
		schema, jsonMode []any
		callFinish       string
		force            any // tool_choice naming get_weather
	}{
		{"openai", openai, []any{"response_format", map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "hero", "schema": heroSchema}}},
			[]any{"response_format", map[string]any{"type": "json_object"}}, "tool_calls",
			map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}},
		// tool_choice is kvrecall's extension of Ollama's API.
		{"ollama", ollama, []any{"format", heroSchema}, []any{"format", "json"}, "stop", "get_weather"},
	} {
		for _, stream := range []bool{false, true} {
			name := api.name
			if stream {
				name += " stream"
			}
			t.Run(name, func(t *testing.T) {
				for _, c := range []struct {
					name  string
					kv    []any
					check func(t *testing.T, a answer)
				}{
					{"forced call", []any{"tools", tools, "tool_choice", api.force}, func(t *testing.T, a answer) {
						require.Len(t, a.calls, 1)
						checkWeather(t, a.calls["get_weather"])
						require.Empty(t, strings.TrimSpace(a.text), "a call is never text")
						require.Equal(t, api.callFinish, a.finish)
					}},
					{"required call", []any{"tools", tools, "tool_choice", "required"}, func(t *testing.T, a answer) {
						require.Len(t, a.calls, 1)
						if args, ok := a.calls["get_weather"]; ok {
							checkWeather(t, args)
						} else {
							require.JSONEq(t, `{}`, a.calls["get_time"])
						}
					}},
					{"tools offered, free answer", []any{"tools", tools}, func(t *testing.T, a answer) {
						require.Empty(t, a.calls)
						require.NotEmpty(t, a.text)
					}},
					{"schema", api.schema, func(t *testing.T, a answer) {
						require.Equal(t, "stop", a.finish)
						require.NoError(t, validHero(a.text), "%q", a.text)
					}},
					{"free", nil, func(t *testing.T, a answer) {
						require.Error(t, validHero(a.text), "%q", a.text)
						require.False(t, json.Valid([]byte(a.text)), "%q", a.text)
					}},
					{"json mode", api.jsonMode, func(t *testing.T, a answer) {
						// JSON mode bounds no string: the model may tell its
						// story inside one until the limit, but never breaks
						// the syntax.
						require.True(t, strings.HasPrefix(a.text, "{"), "%q", a.text)
						if a.finish == "stop" {
							require.True(t, json.Valid([]byte(a.text)), "%q", a.text)
						}
					}},
				} {
					t.Run(c.name, func(t *testing.T) { c.check(t, api.ask(t, stream, c.kv...)) })
				}
			})
		}
	}
}

// The calls of an earlier assistant turn and the tool's answer are taken
// back in OpenAI's shape (arguments as a JSON string, content null).
func TestToolCallHistory(t *testing.T) {
	fx := newStoriesFixture(t)
	msgs := []any{
		map[string]any{"role": "user", "content": "Weather?"},
		map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{"id": "call_1", "type": "function",
			"function": map[string]any{"name": "get_weather", "arguments": `{"city":"Paris"}`}}}},
		map[string]any{"role": "tool", "tool_call_id": "call_1", "content": "Once upon a time it was sunny."},
	}
	resp := fx.do("POST", "/v1/chat/completions", "", map[string]any{"messages": msgs, "tools": []any{weatherTool}, "max_tokens": 8, "temperature": 0})
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", b)

	resp = fx.do("POST", "/api/show", "", map[string]any{"model": "stories"})
	show := decode[map[string]any](t, resp)
	require.Contains(t, show["capabilities"], "tools", "the template reads tools")
}

// A forced call that the token limit cuts off is an error saying so, on
// both APIs, never a fragment of JSON passed off as the answer's text.
func TestForcedCallCutOff(t *testing.T) {
	fx := newStoriesFixture(t)
	force := map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}
	for _, c := range []struct {
		name, path string
		body       map[string]any
	}{
		{"openai", "/v1/chat/completions", map[string]any{"messages": storyMsgs, "tools": []any{weatherTool}, "tool_choice": force, "max_tokens": 6}},
		{"ollama", "/api/chat", map[string]any{"messages": storyMsgs, "tools": []any{weatherTool}, "tool_choice": "get_weather", "stream": false, "options": map[string]any{"num_predict": 6}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			resp := fx.do("POST", c.path, "", c.body)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusInternalServerError, resp.StatusCode, "%s", b)
			require.Contains(t, string(b), "the forced tool call was cut off")
			require.Contains(t, string(b), "raise the token limit")
		})
	}
	t.Run("openai stream", func(t *testing.T) {
		resp := fx.do("POST", "/v1/chat/completions", "", map[string]any{"messages": storyMsgs, "tools": []any{weatherTool}, "tool_choice": force, "max_tokens": 6, "stream": true})
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Contains(t, string(b), "the forced tool call was cut off")
		require.NotContains(t, string(b), "[DONE]", "a failed stream does not look complete")
		require.NotContains(t, string(b), `"content":"{`, "no fragment of the call is streamed")
	})
}
