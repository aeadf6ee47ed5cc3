package chat

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var weather = []Tool{
	{Name: "get_weather", Description: "Weather in a city", Parameters: json.RawMessage(`{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}`)},
	{Name: "get_time", Description: "Local time"},
}

// In the style of Qwen2.5's template: tools as JSON in the system turn,
// earlier calls as <tool_call> blocks, results as tool turns.
const qwenTools = `{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for message in messages %}{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant{% for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{%- endfor %}<|im_start|>assistant
`

func TestRenderTools(t *testing.T) {
	tpl, err := New(qwenTools, "", "")
	require.NoError(t, err)
	msgs := []Message{
		{Role: "user", Content: "Weather in Paris?"},
		{Role: "assistant", ToolCalls: []ToolCall{{Name: "get_weather", Arguments: json.RawMessage(`{"city":"Paris"}`)}}},
		{Role: "tool", Content: "sunny"},
	}
	got, err := tpl.RenderTools(msgs, weather, true)
	require.NoError(t, err)
	require.Contains(t, got, "<tools>\n{")
	require.Contains(t, got, `"name":"get_weather"`)
	require.Contains(t, got, `"required":["city"]`, "the schema reaches the template as JSON")
	require.Contains(t, got, "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant")
	plain, err := tpl.Render(msgs[:1], true)
	require.NoError(t, err)
	require.NotContains(t, plain, "<tools>", "no tools, no tool section")

	_, err = (&Template{}).RenderTools(msgs[:1], weather, true)
	require.ErrorContains(t, err, "no chat template to offer tools")
	_, err = tpl.RenderTools(msgs[:1], []Tool{{Name: "x", Parameters: json.RawMessage(`{`)}}, true)
	require.ErrorContains(t, err, "tool x: parameters are not JSON")
}

func TestParseToolCalls(t *testing.T) {
	call := func(name, args string) ToolCall { return ToolCall{Name: name, Arguments: json.RawMessage(args)} }
	cases := []struct {
		name    string
		text    string
		tools   []Tool
		content string
		calls   []ToolCall
		err     string
	}{
		{"no tools, nothing parsed", `<tool_call>{"name":"get_time"}</tool_call>`, nil, `<tool_call>{"name":"get_time"}</tool_call>`, nil, ""},
		{"plain answer", "It is sunny.", weather, "It is sunny.", nil, ""},
		{"hermes", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", weather, "",
			[]ToolCall{call("get_weather", `{"city": "Paris"}`)}, ""},
		{"hermes, two calls and text", "Let me check.\n<tool_call>{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}</tool_call>\n<tool_call>{\"name\":\"get_time\",\"arguments\":{}}</tool_call>", weather,
			"Let me check.", []ToolCall{call("get_weather", `{"city":"Oslo"}`), call("get_time", `{}`)}, ""},
		{"hermes, arguments as a string", `<tool_call>{"name":"get_weather","arguments":"{\"city\":\"Rome\"}"}</tool_call>`, weather, "",
			[]ToolCall{call("get_weather", `{"city":"Rome"}`)}, ""},
		{"hermes, no arguments", `<tool_call>{"name":"get_time"}</tool_call>`, weather, "", []ToolCall{call("get_time", `{}`)}, ""},
		{"llama 3 JSON", ` {"name": "get_weather", "parameters": {"city": "Lima"}}`, weather, "", []ToolCall{call("get_weather", `{"city": "Lima"}`)}, ""},
		{"llama 3 python tag", `<|python_tag|>{"name": "get_time", "parameters": {}}`, weather, "", []ToolCall{call("get_time", `{}`)}, ""},
		{"JSON answer that is no call", `{"answer": 42}`, weather, `{"answer": 42}`, nil, ""},
		{"unknown tool", `<tool_call>{"name":"launch","arguments":{}}</tool_call>`, weather, "", nil, `unknown tool "launch" (tools: get_weather, get_time)`},
		{"unknown tool, llama 3", `{"name": "launch", "parameters": {}}`, weather, "", nil, `unknown tool "launch"`},
		{"malformed JSON", `<tool_call>{"name":"get_weather","arguments":{"city":}</tool_call>`, weather, "", nil, "malformed JSON"},
		{"malformed JSON, llama 3", `<|python_tag|>{"name": "get_time", "parameters": {`, weather, "", nil, "malformed JSON"},
		{"unterminated", `<tool_call>{"name":"get_time","argu`, weather, "", nil, "<tool_call> without </tool_call>"},
		{"no name", `<tool_call>{"arguments":{}}</tool_call>`, weather, "", nil, "names no tool"},
		{"arguments not an object", `<tool_call>{"name":"get_time","arguments":[1]}</tool_call>`, weather, "", nil, "not a JSON object"},
		{"two objects in one call", `<tool_call>{"name":"get_time"} {"name":"get_time"}</tool_call>`, weather, "", nil, "text after the call"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			content, calls, err := ParseToolCalls(c.text, c.tools)
			if c.err != "" {
				require.ErrorIs(t, err, ErrToolCall)
				require.ErrorContains(t, err, c.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.content, content)
			require.Equal(t, c.calls, calls)
		})
	}
}

// Fed one small piece at a time (as tokens come), the filter never
// releases any part of a call, and what it releases is the answer's text.
func TestToolFilter(t *testing.T) {
	cases := []struct {
		name, text, released string
	}{
		{"plain", "It is sunny in <b>Paris</b>.", "It is sunny in <b>Paris</b>."},
		{"a call after text", "Checking. <tool_call>{\"name\":\"get_time\"}</tool_call> Done.", "Checking.  Done."},
		{"only a call", "\n<tool_call>\n{\"name\":\"get_time\"}\n</tool_call>", "\n"},
		{"llama 3 call", ` {"name": "get_time", "parameters": {}}`, ""},
		{"python tag", `<|python_tag|>{"name": "get_time", "parameters": {}}`, ""},
		{"JSON that is no call is released at the end", `{"answer": 42}`, `{"answer": 42}`},
		{"a tag that never completes", "a <tool_ b", "a <tool_ b"},
		{"a brace later is text", "x = {1}", "x = {1}"},
	}
	for _, c := range cases {
		for _, size := range []int{1, 2, 3, 7} {
			f := NewToolFilter(weather)
			var out strings.Builder
			for i := 0; i < len(c.text); i += size {
				r := f.Add(c.text[i:min(len(c.text), i+size)])
				require.NotContains(t, r, "tool_call", "%s/%d: a fragment of a call escaped", c.name, size)
				require.NotContains(t, r, `"name"`, "%s/%d", c.name, size)
				out.WriteString(r)
			}
			out.WriteString(f.Flush())
			require.Equal(t, c.released, out.String(), "%s, pieces of %d bytes", c.name, size)
		}
	}
	f := NewToolFilter(nil)
	require.Equal(t, "<tool_call>", f.Add("<tool_call>"), "without tools text passes through")
}

func TestToolChoice(t *testing.T) {
	tools := []Tool{{Name: "a", Parameters: json.RawMessage(`{"type":"object","properties":{"x":{"type":"integer"}}}`)}, {Name: "b"}}
	for _, tc := range []struct {
		choice  string
		offered int
		schema  string // "" for none
		err     string
	}{
		{choice: "", offered: 2},
		{choice: "auto", offered: 2},
		{choice: "none", offered: 0},
		{choice: "a", offered: 2, schema: `{"type":"object","properties":{"name":{"const":"a"},"arguments":{"type":"object","properties":{"x":{"type":"integer"}}}},"required":["name","arguments"],"additionalProperties":false}`},
		{choice: "required", offered: 2, schema: `{"anyOf":[` +
			`{"type":"object","properties":{"name":{"const":"a"},"arguments":{"type":"object","properties":{"x":{"type":"integer"}}}},"required":["name","arguments"],"additionalProperties":false},` +
			`{"type":"object","properties":{"name":{"const":"b"},"arguments":{"type":"object","properties":{},"additionalProperties":false}},"required":["name","arguments"],"additionalProperties":false}]}`},
		{choice: "c", err: `tool choice "c" is none of "auto", "none", "required" or a tool's name (tools: a, b)`},
	} {
		t.Run(tc.choice, func(t *testing.T) {
			offered, schema, err := ToolChoice(tools, tc.choice)
			if tc.err != "" {
				require.EqualError(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Len(t, offered, tc.offered)
			if tc.schema == "" {
				require.Nil(t, schema)
				return
			}
			// Byte equality, not JSONEq: "name" must come before "arguments".
			require.Equal(t, tc.schema, string(schema))
		})
	}
	_, _, err := ToolChoice(nil, "required")
	require.ErrorContains(t, err, "needs tools")
}
