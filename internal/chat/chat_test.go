package chat

import (
	"os"
	"strings"
	"testing"

	"github.com/nikolalohinski/gonja/v2"
	"github.com/stretchr/testify/require"
)

const chatML = `{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}`

const llama3 = `{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}`

// In the style of Phi-3's template: role tags, <|end|>, EOS when no reply follows.
const phi3 = `{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}`

// In the style of Qwen3's template: ChatML with whitespace control,
// attribute access and the empty think block when thinking is off.
const qwen3 = `{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}`

// Gemma 3's template (its text part; Gemma 2's is the same without the
// system prefix): <start_of_turn>/<end_of_turn>, the assistant's role is
// "model", a system message is folded into the first user turn, roles must
// alternate, BOS comes from the template. The real one writes the prefix as
// an inline conditional, (first_user_prefix if loop.first else ""), which
// gonja v2 does not parse ("Unbalanced parenthesis"); such a template is
// rendered with Ollama's format instead (TestTemplateGonjaCannotParse...).
// Here the same logic as an if block, which gonja runs.
const gemma = `{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' }}{%- if loop.first -%}{{ first_user_prefix }}{%- endif -%}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}`

func TestChatTemplates(t *testing.T) {
	mk := func(src, bos string) *Template {
		tpl, err := New(src, bos, "")
		require.NoError(t, err)
		return tpl
	}
	msgs := []Message{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "Hi there "}}
	cases := []struct {
		name string
		c    *Template
		msgs []Message
		bos  bool
		want string
		err  string
	}{
		{"chatml", mk(chatML, ""), msgs, true,
			"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there <|im_end|>\n<|im_start|>assistant\n", ""},
		{"chatml default system", mk(chatML, ""), msgs[1:], true,
			"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there <|im_end|>\n<|im_start|>assistant\n", ""},
		{"llama3", mk(llama3, "<|begin_of_text|>"), msgs, true,
			"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", ""},
		{"llama3 after a document has no BOS", mk(llama3, "<|begin_of_text|>"), msgs[1:], false,
			"<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", ""},
		{"phi3", mk(phi3, "<s>"), msgs, true,
			"<|system|>\nBe brief.<|end|>\n<|user|>\nHi there <|end|>\n<|assistant|>\n", ""},
		{"qwen3", mk(qwen3, ""), msgs, true,
			"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there <|im_end|>\n<|im_start|>assistant\n", ""},
		{"gemma", mk(gemma, "<bos>"), msgs, true,
			"<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n", ""},
		{"gemma multi-turn", mk(gemma, "<bos>"), []Message{{Role: "user", Content: "Hi"}, {Role: "assistant", Content: "Hello."}, {Role: "user", Content: "Bye"}}, true,
			"<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n", ""},
		{"gemma roles must alternate", mk(gemma, "<bos>"), []Message{{Role: "user", Content: "a"}, {Role: "user", Content: "b"}}, true, "", "Conversation roles must alternate"},
		{"template raises", mk(llama3, ""), []Message{{Role: "user", Content: "a"}, {Role: "system", Content: "b"}}, true, "", "system must come first"},
		{"fallback", &Template{}, msgs, true, "Be brief.\n\nHi there ", ""},
		{"bad role", &Template{}, []Message{{Role: "robot", Content: "x"}}, true, "", "unknown message role"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := c.c.Render(c.msgs, c.bos)
			if c.err != "" {
				require.ErrorContains(t, err, c.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.want, got)
		})
	}
	require.True(t, mk(llama3, "<|begin_of_text|>").StartsWithBOS("<|begin_of_text|>x"))
}

// Gemma 3's own chat template (Google's, as GGUFs carry it) puts an inline
// if inside parentheses, which gonja cannot parse. It is rendered with
// Ollama's gemma3-instruct format instead, the format Ollama itself maps
// this template to. The prompt is what the Jinja template would give, and
// one more newline after the last "<start_of_turn>model\n", which Ollama's
// format writes too (what Ollama sends a Gemma 3 model).
func TestTemplateGonjaCannotParseUsesOllamaFormat(t *testing.T) {
	src, err := os.ReadFile("testdata/gemma3.jinja")
	require.NoError(t, err)
	_, gerr := gonja.FromString(string(src))
	require.Error(t, gerr, "gonja parses Gemma 3's template now: the fallback is no longer exercised by this test")
	c, err := New(string(src), "<bos>", "<eos>")
	require.NoError(t, err)
	require.True(t, c.HasTemplate())
	require.Equal(t, "gemma3-instruct", c.Format())
	for _, tc := range []struct {
		name    string
		msgs    []Message
		withBOS bool
		want    string
	}{
		{"user", []Message{{Role: "user", Content: "Hi"}}, true,
			"<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n\n"},
		{"no BOS", []Message{{Role: "user", Content: "Hi"}}, false,
			"<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n\n"},
		{"system and turns", []Message{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "Hi"}, {Role: "assistant", Content: "Hello."}, {Role: "user", Content: "Bye"}}, true,
			"<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Render(tc.msgs, tc.withBOS)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
	_, err = New("{{ (a if b else c) }} and nothing like any chat format at all, "+strings.Repeat("x", 400), "", "")
	require.ErrorContains(t, err, "matches none of Ollama's chat formats")
}
