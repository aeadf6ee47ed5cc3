package kvrecall_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// haystackFixture is the recall model with one ingested haystack.
type haystackFixture struct {
	m                 *kvrecall.Model
	doc               *kvrecall.Document
	text              string
	questions, answer []string
	docTokens         int
}

func newHaystack(t *testing.T, dir string, length int, depths []float64) *haystackFixture {
	path := testmodels.Recall(t)
	m, err := kvrecall.Open(context.Background(), path, kvrecall.Options{Threads: 2, ContextLength: length + 64, DataDir: dir})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(length, depths, 3)
	require.NoError(t, err)
	words := func(ids []int32) string {
		s, err := m.Detokenize(ids)
		require.NoError(t, err)
		return strings.TrimPrefix(s, " ")
	}
	fx := &haystackFixture{m: m, text: words(c.Tokens[1:]), docTokens: len(c.Tokens)}
	for _, n := range c.Needles {
		fx.questions = append(fx.questions, words(voc.Question(n)))
		fx.answer = append(fx.answer, " "+words(n.Values))
	}
	fx.doc, err = m.Ingest(context.Background(), "hay", fx.text, kvrecall.IngestOptions{})
	require.NoError(t, err)
	require.Equal(t, len(c.Tokens), fx.doc.Info().Tokens, "the text round-trips to the case's tokens")
	return fx
}

// Questions reuse the document; Usage says so; the per-call method and
// budget decide how many pages are retrieved; a Model call naming the
// document is the same as the Document's; the document outlives the
// process (a new Model on the same data directory) until deleted.
func TestDocumentsAndUsage(t *testing.T) {
	dir := t.TempDir()
	fx := newHaystack(t, dir, 2048, []float64{0.5})
	ctx := context.Background()
	qTokens, err := fx.m.CountTokens(fx.questions[0])
	require.NoError(t, err)
	pages := map[string]int{}
	for _, c := range []struct {
		method string
		budget int
	}{{"retro", 512}, {"retro", 1024}, {"quest", 1024}, {"dense", 0}} {
		t.Run(fmt.Sprint(c.method, c.budget), func(t *testing.T) {
			res, err := fx.doc.Ask(ctx, fx.questions[0], kvrecall.GenerateOptions{Method: c.method, Budget: c.budget, MaxTokens: 3})
			require.NoError(t, err)
			require.Equal(t, fx.answer[0], res.Text)
			u := res.Usage
			require.Equal(t, kvrecall.Usage{PromptTokens: fx.docTokens + qTokens, CompletionTokens: 3, TotalTokens: fx.docTokens + qTokens + 3,
				CachedTokens: fx.docTokens, PagesRetrieved: u.PagesRetrieved, RetrievedKVBytes: u.RetrievedKVBytes, ResidentKVBytes: u.ResidentKVBytes}, u)
			require.Positive(t, u.PagesRetrieved)
			require.Positive(t, u.RetrievedKVBytes)
			require.Positive(t, u.ResidentKVBytes)
			pages[fmt.Sprint(c.method, c.budget)] = u.PagesRetrieved

			via, err := fx.m.Generate(ctx, fx.questions[0], kvrecall.GenerateOptions{Document: "hay", Method: c.method, Budget: c.budget, MaxTokens: 3})
			require.NoError(t, err)
			require.Equal(t, res.Text, via.Text)
			require.Equal(t, res.Usage, via.Usage)
		})
	}
	require.Less(t, pages["retro512"], pages["retro1024"], "a larger budget retrieves more pages")
	require.Less(t, pages["retro1024"], pages["dense0"], "dense attends to every page")

	// Ingesting the same text again reuses the stored document.
	again, err := fx.m.Ingest(ctx, "hay", fx.text, kvrecall.IngestOptions{Progress: func(int, int) { t.Error("prefilled again") }})
	require.NoError(t, err)
	require.Equal(t, fx.doc.Info(), again.Info())
	list, err := fx.m.Documents()
	require.NoError(t, err)
	require.Len(t, list, 1)
	require.Equal(t, "hay", list[0].ID)

	// A later process.
	fx.m.Close()
	m2, err := kvrecall.Open(ctx, testmodels.Recall(t), kvrecall.Options{Threads: 2, ContextLength: 2048 + 64, DataDir: dir, Method: "retro", Budget: 1024})
	require.NoError(t, err)
	defer m2.Close()
	doc, err := m2.Document("hay")
	require.NoError(t, err)
	res, err := doc.Ask(ctx, fx.questions[0], kvrecall.GenerateOptions{MaxTokens: 3})
	require.NoError(t, err)
	require.Equal(t, fx.answer[0], res.Text)
	require.Equal(t, pages["retro1024"], res.Usage.PagesRetrieved, "the model's default method and budget apply")
	require.NoError(t, m2.DeleteDocument("hay"))
	_, err = m2.Document("hay")
	require.ErrorIs(t, err, kvrecall.ErrNoDocument)
}

// Chat renders with the model's template exactly as ChatPrompt shows, with
// BOS from the template (not twice) and none after a document.
func TestChatTemplate(t *testing.T) {
	const tpl = `{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}
{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}`
	path := filepath.Join(t.TempDir(), "stories-chat.gguf")
	require.NoError(t, gguf.Copy(testmodels.StoriesV3(t), path, func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
		kv["tokenizer.chat_template"] = tpl
		return ts, nil
	}))
	ctx := context.Background()
	m, err := kvrecall.Open(ctx, path, kvrecall.Options{Threads: 2, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	require.Equal(t, tpl, m.Info().ChatTemplate)
	require.Regexp(t, `^CPU \(.+, cpu(, loaded)?\)$`, m.Info().Device, "no Device option: every layer on the CPU")
	require.Zero(t, m.Info().GPULayers)
	msgs := []kvrecall.Message{{Role: "system", Content: "Be kind."}, {Role: "user", Content: "Once upon a time"}}
	cases := []struct {
		name          string
		afterDocument bool
		want          string
	}{
		{"alone", false, "<s>[system] Be kind.\n[user] Once upon a time\n[assistant]"},
		{"after a document", true, "[system] Be kind.\n[user] Once upon a time\n[assistant]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := m.ChatPrompt(msgs, nil, c.afterDocument)
			require.NoError(t, err)
			require.Equal(t, c.want, p)
		})
	}
	opts := kvrecall.GenerateOptions{MaxTokens: 8}
	res, err := m.Chat(ctx, msgs, opts)
	require.NoError(t, err)
	p, _ := m.ChatPrompt(msgs, nil, false)
	n, err := m.CountTokens(p)
	require.NoError(t, err)
	require.Equal(t, n, res.Usage.PromptTokens, "the template's <s> is the only BOS")

	doc, err := m.Ingest(ctx, "", "Tom had a red ball.", kvrecall.IngestOptions{})
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(doc.ID(), "doc-"), "an empty id names the document by its text's hash: %s", doc.ID())
	res, err = doc.Chat(ctx, msgs, opts)
	require.NoError(t, err)
	p, _ = m.ChatPrompt(msgs, nil, true)
	n, _ = m.CountTokens(p)
	require.Equal(t, doc.Info().Tokens+n, res.Usage.PromptTokens)
	via, err := m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: 8, Document: doc.ID()})
	require.NoError(t, err)
	require.Equal(t, res.Text, via.Text)
}

// Bad settings and input are errors that name what is wrong.
func TestBadInput(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m, err := kvrecall.Open(ctx, testmodels.StoriesV3(t), kvrecall.Options{Threads: 2, ContextLength: 256, DataDir: dir})
	require.NoError(t, err)
	defer m.Close()
	doc, err := m.Ingest(ctx, "d", "Lily had a cat.", kvrecall.IngestOptions{})
	require.NoError(t, err)
	cases := []struct {
		name string
		call func() error
		want string
		is   error
	}{
		{"unknown method", func() error {
			_, err := doc.Ask(ctx, "Who?", kvrecall.GenerateOptions{Method: "bogus"})
			return err
		}, "GenerateOptions.Method", nil},
		{"unknown method without a document", func() error {
			_, err := m.Generate(ctx, "Hi", kvrecall.GenerateOptions{Method: "bogus"})
			return err
		}, "retro", nil},
		{"negative budget", func() error {
			_, err := doc.Ask(ctx, "Who?", kvrecall.GenerateOptions{Budget: -1})
			return err
		}, "GenerateOptions.Budget -1 is negative", nil},
		{"negative max tokens", func() error {
			_, err := m.Generate(ctx, "Hi", kvrecall.GenerateOptions{MaxTokens: -2})
			return err
		}, "GenerateOptions.MaxTokens -2", nil},
		{"unknown document", func() error {
			_, err := m.Generate(ctx, "Hi", kvrecall.GenerateOptions{Document: "nope"})
			return err
		}, "nope", kvrecall.ErrNoDocument},
		{"another document", func() error {
			_, err := doc.Ask(ctx, "Hi", kvrecall.GenerateOptions{Document: "other"})
			return err
		}, `names another document`, nil},
		{"empty prompt", func() error {
			_, err := m.Generate(ctx, "", kvrecall.GenerateOptions{})
			return err
		}, "empty prompt", nil},
		{"bad role", func() error {
			_, err := m.Chat(ctx, []kvrecall.Message{{Role: "robot", Content: "x"}}, kvrecall.GenerateOptions{})
			return err
		}, `unknown message role "robot"`, nil},
		{"no messages", func() error {
			_, err := m.Chat(ctx, nil, kvrecall.GenerateOptions{})
			return err
		}, "messages must not be empty", nil},
		{"bad document id", func() error {
			_, err := m.Ingest(ctx, "../x", "text", kvrecall.IngestOptions{})
			return err
		}, `invalid document id "../x"`, nil},
		{"prompt beyond the context", func() error {
			_, err := m.Generate(ctx, strings.Repeat("Once upon a time ", 100), kvrecall.GenerateOptions{})
			return err
		}, "context length", kvrecall.ErrContextFull},
		{"bad default method", func() error {
			_, err := kvrecall.Open(ctx, testmodels.StoriesV3(t), kvrecall.Options{Method: "bogus"})
			return err
		}, "Options.Method", nil},
		{"missing file", func() error {
			_, err := kvrecall.Open(ctx, filepath.Join(dir, "none.gguf"), kvrecall.Options{})
			var oe *kvrecall.OpenError
			if !errors.As(err, &oe) || oe.Path != filepath.Join(dir, "none.gguf") {
				return fmt.Errorf("not an OpenError naming the file: %v", err)
			}
			return err
		}, "none.gguf", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.call()
			require.ErrorContains(t, err, c.want)
			if c.is != nil {
				require.ErrorIs(t, err, c.is)
			}
		})
	}
	// A stream yields a call's error once, then ends.
	n := 0
	for _, err := range m.Stream(ctx, "Hi", kvrecall.GenerateOptions{Method: "bogus"}) {
		require.ErrorContains(t, err, "bogus")
		n++
	}
	require.Equal(t, 1, n)
	// After Close every call is refused.
	m.Close()
	_, err = m.Generate(ctx, "Hi", kvrecall.GenerateOptions{MaxTokens: 1})
	require.ErrorIs(t, err, kvrecall.ErrClosed)
}

// A stream's chunks add up to the response's text; the callback sees the
// same tokens; breaking out stops generation (range-over-func would panic
// if the iterator yielded again).
func TestStream(t *testing.T) {
	ctx := context.Background()
	m, err := kvrecall.Open(ctx, testmodels.StoriesV3(t), kvrecall.Options{Threads: 2, ContextLength: 256, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	var viaCallback, viaChunks strings.Builder
	opts := kvrecall.GenerateOptions{MaxTokens: 20, OnToken: func(tk kvrecall.Token) error { viaCallback.WriteString(tk.Text); return nil }}
	var last *kvrecall.Response
	for c, err := range m.ChatStream(ctx, []kvrecall.Message{{Role: "user", Content: "Once upon a time"}}, opts) {
		require.NoError(t, err)
		require.Nil(t, last, "nothing after the last chunk")
		if c.Response != nil {
			last = c.Response
			continue
		}
		viaChunks.WriteString(c.Token.Text)
	}
	require.NotNil(t, last)
	require.Equal(t, last.Text, viaChunks.String())
	require.Equal(t, last.Text, viaCallback.String())
	require.Equal(t, 20, last.Usage.CompletionTokens)

	n := 0
	for c, err := range m.Stream(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 50}) {
		require.NoError(t, err)
		require.Nil(t, c.Response)
		if n++; n == 3 {
			break
		}
	}
	require.Equal(t, 3, n)
	// A callback's error stops the call and is returned.
	stop := errors.New("enough")
	res, err := m.Generate(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 50, OnToken: func(kvrecall.Token) error { return stop }})
	require.ErrorIs(t, err, stop)
	require.Equal(t, 1, res.Usage.CompletionTokens)
}

// Generate and Ask run concurrently on one Model (run under -race by
// make test): every answer equals the one computed alone.
func TestConcurrentGenerateAndAsk(t *testing.T) {
	fx := newHaystack(t, t.TempDir(), 1024, []float64{0.2, 0.5, 0.8})
	ctx := context.Background()
	prompt := fx.text + " " + fx.questions[1]
	alone, err := fx.m.Generate(ctx, prompt, kvrecall.GenerateOptions{MaxTokens: 3})
	require.NoError(t, err)
	require.Equal(t, fx.answer[1], alone.Text)
	const goroutines = 4
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*len(fx.questions))
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if g%2 == 0 {
				res, err := fx.m.Generate(ctx, prompt, kvrecall.GenerateOptions{MaxTokens: 3})
				if err != nil || res.Text != alone.Text {
					errs <- fmt.Errorf("goroutine %d, Generate: %v %+v", g, err, res)
				}
				return
			}
			for i, q := range fx.questions {
				method := []string{"retro", "quest"}[(i+g)%2]
				res, err := fx.doc.Ask(ctx, q, kvrecall.GenerateOptions{Method: method, Budget: 512, MaxTokens: 3})
				if err != nil || res.Text != fx.answer[i] {
					errs <- fmt.Errorf("goroutine %d, %s, needle %d: %v %+v", g, method, i, err, res)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Tools reach the template; an answer without calls comes back as text,
// streamed whole; tools without a template, or on a raw prompt, are errors.
// (Parsing and holding back calls: internal/chat's TestParseToolCalls and
// TestToolFilter.)
func TestChatTools(t *testing.T) {
	const tpl = `{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}
{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}`
	path := testmodels.StoriesWithTemplate(t, tpl)
	ctx := context.Background()
	m, err := kvrecall.Open(ctx, path, kvrecall.Options{Threads: 2, ContextLength: 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	tools := []kvrecall.Tool{{Name: "get_weather", Parameters: json.RawMessage(`{"type":"object"}`)}, {Name: "get_time"}}
	msgs := []kvrecall.Message{{Role: "user", Content: "Once upon a time"}}
	p, err := m.ChatPrompt(msgs, tools, false)
	require.NoError(t, err)
	require.Equal(t, "Tools: get_weather get_time\nOnce upon a time", p)
	var streamed strings.Builder
	res, err := m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: 12, Tools: tools,
		OnToken: func(tk kvrecall.Token) error { streamed.WriteString(tk.Text); return nil }})
	require.NoError(t, err)
	require.Empty(t, res.ToolCalls)
	require.NotEmpty(t, res.Text)
	require.Equal(t, strings.TrimSpace(streamed.String()), res.Text)

	// A forced call that the token limit cuts inside its JSON is an error
	// that says so, not only "malformed JSON".
	for _, max := range []int{3, 30} {
		_, err = m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: max, Tools: tools, ToolChoice: "get_weather"})
		require.ErrorIs(t, err, kvrecall.ErrToolCall)
		require.ErrorContains(t, err, "cut off")
		require.ErrorContains(t, err, "stop reason length")
	}

	_, err = m.Generate(ctx, "Once", kvrecall.GenerateOptions{Tools: tools})
	require.ErrorContains(t, err, "use Chat")
	plain, err := kvrecall.Open(ctx, testmodels.StoriesV3(t), kvrecall.Options{Threads: 2, ContextLength: 256, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer plain.Close()
	_, err = plain.Chat(ctx, msgs, kvrecall.GenerateOptions{Tools: tools})
	require.ErrorContains(t, err, "no chat template to offer tools")
}
