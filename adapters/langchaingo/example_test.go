package kvlangchaingo_test

import (
	"context"
	"fmt"
	"os"

	"github.com/tmc/langchaingo/llms"

	"github.com/kvrecall/kvrecall"
	kvlangchaingo "github.com/kvrecall/kvrecall/adapters/langchaingo"
)

// stories is a tiny pretrained model (TinyStories) beside the repository.
const stories = "../../../shared/models/stories260k-f32.gguf"

// A kvrecall model as a langchaingo llms.Model: streamed, stopped at a
// stop word, with usage in GenerationInfo.
func ExampleNew() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kvrecall-example")
	defer os.RemoveAll(dir)
	m, err := kvrecall.Open(ctx, stories, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	var llm llms.Model = kvlangchaingo.New(m, kvlangchaingo.Options{MaxTokens: 32})
	resp, err := llm.GenerateContent(ctx, []llms.MessageContent{llms.TextParts(llms.ChatMessageTypeHuman, "Once upon a time")},
		llms.WithStopWords([]string{"."}),
		llms.WithStreamingFunc(func(_ context.Context, b []byte) error { fmt.Printf("[%s]", b); return nil }))
	if err != nil {
		fmt.Println(err)
		return
	}
	c := resp.Choices[0]
	fmt.Printf("\n%q %s, %d prompt + %d completion tokens\n", c.Content, c.StopReason, c.GenerationInfo["PromptTokens"], c.GenerationInfo["CompletionTokens"])
	// Output:
	// [,][ there][ was][ a][ little][ g][ir][l][ named][ Lily]
	// ", there was a little girl named Lily" stop, 5 prompt + 11 completion tokens
}
