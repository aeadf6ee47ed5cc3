package kvrecall_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
)

// stories is a tiny pretrained model (260k parameters, TinyStories) that
// lives beside the repository; the examples generate real English with it.
const stories = "../shared/models/stories260k-f32.gguf"

// Open loads a GGUF model. Bad files give an *OpenError that names the
// file and the problem.
func ExampleOpen() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	in := m.Info()
	fmt.Println(in.Arch, in.Layers, "layers,", in.Heads, "heads, context", in.ContextLength)

	_, err = kvrecall.Open(ctx, filepath.Join(dir, "missing.gguf"), kvrecall.Options{})
	var oe *kvrecall.OpenError
	fmt.Println(errors.As(err, &oe), filepath.Base(oe.Path))
	// Output:
	// llama 5 layers, 8 heads, context 512
	// true missing.gguf
}

// Generate continues a prompt; Usage counts its tokens.
func ExampleModel_Generate() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	res, err := m.Generate(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 24, Stop: []string{"."}})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%q\n", res.Text)
	fmt.Println(res.StopReason, res.Usage.PromptTokens, "prompt tokens,", res.Usage.CompletionTokens, "generated")
	// Output:
	// ", there was a little girl named Lily"
	// stop 5 prompt tokens, 11 generated
}

// Format constrains the answer to JSON, here to a JSON Schema, with
// llama.cpp's grammar sampler: even a model that only knows children's
// stories answers with an object that decodes into the schema's type.
// A schema the grammar cannot be built from is an error wrapping
// ErrFormat that names the keyword.
func ExampleModel_Generate_json() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	schema := json.RawMessage(`{"type": "object",
		"properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 1, "maximum": 9}},
		"required": ["name", "age"], "additionalProperties": false}`)
	res, err := m.Generate(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 100, Format: schema})
	if err != nil {
		fmt.Println(err)
		return
	}
	var hero struct {
		Name string `json:"name"`
		Age  int    `json:"age"`
	}
	fmt.Println(strings.TrimSpace(res.Text))
	fmt.Println(json.Unmarshal([]byte(res.Text), &hero), res.StopReason)
	fmt.Printf("%+v\n", hero)

	_, err = m.Generate(ctx, "Once", kvrecall.GenerateOptions{Format: json.RawMessage(`{"type": "int"}`)})
	fmt.Println(errors.Is(err, kvrecall.ErrFormat))
	fmt.Println(err)
	// Output:
	// { "name" : "I can help m" , "age" : 3 }
	// <nil> eog
	// {Name:I can help m Age:3}
	// true
	// GenerateOptions.Format: bad output format: schema type: unknown type int (string, number, integer, boolean, object, array, null)
}

// A document is prefilled once; each question reuses its pages and
// attends to a budget of them. Here the foundry's recall model finds a
// needle in a 4096-token haystack attending to 1024 tokens per query.
func ExampleDocument_Ask() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "recall.gguf")
	if _, err := foundry.WriteRecall(path, foundry.RecallOptions{}); err != nil {
		fmt.Println(err)
		return
	}
	m, err := kvrecall.Open(ctx, path, kvrecall.Options{Threads: 2, ContextLength: 4200, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	// The recall model's vocabulary makes haystacks of words with a needle:
	// a key word followed by its value words.
	f, _ := gguf.Open(path)
	voc, _ := haystack.LoadVocab(f)
	c, _ := voc.NewCase(4096, []float64{0.5}, 7)
	words := func(ids []int32) string { s, _ := m.Detokenize(ids); return strings.TrimPrefix(s, " ") }
	text, question, answer := words(c.Tokens[1:]), words(voc.Question(c.Needles[0])), " "+words(c.Needles[0].Values)

	doc, err := m.Ingest(ctx, "haystack", text, kvrecall.IngestOptions{}) // prefill once; pages to RAM and disk
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, method := range []string{"retro", "retro+heads", "dense"} {
		res, err := doc.Ask(ctx, question, kvrecall.GenerateOptions{Method: method, Budget: 1024, MaxTokens: voc.AnswerLength})
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("%-11s correct: %v, document tokens reused: %d, pages retrieved: %d\n", method, res.Text == answer, res.Usage.CachedTokens, res.Usage.PagesRetrieved)
	}
	// Output:
	// retro       correct: true, document tokens reused: 4096, pages retrieved: 30
	// retro+heads correct: true, document tokens reused: 4096, pages retrieved: 25
	// dense       correct: true, document tokens reused: 4096, pages retrieved: 128
}

// Chat renders messages with the model's chat template (a model without
// one, like this one, gets its contents joined by blank lines).
func ExampleModel_Chat() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	msgs := []kvrecall.Message{
		{Role: "system", Content: "Lily and Ben play in the park."},
		{Role: "user", Content: "One day, Lily saw"},
	}
	res, err := m.Chat(ctx, msgs, kvrecall.GenerateOptions{MaxTokens: 16, Stop: []string{"."}})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%q\n", res.Text)
	// Output: " a big, red ball"
}

// Stream yields the answer token by token, then a last chunk with the
// whole response and its usage. Breaking out of the loop stops generation.
func ExampleModel_Stream() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	var sb strings.Builder
	for chunk, err := range m.Stream(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 12}) {
		if err != nil {
			fmt.Println(err)
			return
		}
		if chunk.Response != nil {
			fmt.Println(chunk.Response.Usage.CompletionTokens, "tokens:", chunk.Response.Text == sb.String())
			break
		}
		sb.WriteString(chunk.Token.Text)
	}
	fmt.Printf("%q\n", sb.String())
	// Output:
	// 12 tokens: true
	// ", there was a little girl named Lily. She"
}

// Cancelling the context stops decoding at the next token: the call
// returns the context's error with the partial response.
func ExampleModel_Generate_cancel() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	n := 0
	res, err := m.Generate(ctx, "Once upon a time", kvrecall.GenerateOptions{MaxTokens: 100, OnToken: func(kvrecall.Token) error {
		if n++; n == 5 {
			cancel() // e.g. the client went away
		}
		return nil
	}})
	fmt.Println(errors.Is(err, context.Canceled), res.StopReason, res.Usage.CompletionTokens)
	// Output: true cancelled 5
}
