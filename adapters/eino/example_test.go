package kveino_test

import (
	"context"
	"fmt"
	"os"

	"github.com/cloudwego/eino/components/model"
	"github.com/cloudwego/eino/schema"

	"github.com/kvrecall/kvrecall"
	kveino "github.com/kvrecall/kvrecall/adapters/eino"
)

// stories is a tiny pretrained model (TinyStories) beside the repository.
const stories = "../../../shared/models/stories260k-f32.gguf"

// A kvrecall model as an eino chat model: a streamed answer whose last
// chunk carries the usage.
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
	cm, err := kveino.New(m, kveino.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	var _ model.ToolCallingChatModel = cm
	sr, err := cm.Stream(ctx, []*schema.Message{schema.UserMessage("Once upon a time")}, model.WithMaxTokens(8))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer sr.Close()
	for {
		msg, err := sr.Recv()
		if err != nil {
			break // io.EOF at the end
		}
		if msg.ResponseMeta != nil {
			u := msg.ResponseMeta.Usage
			fmt.Printf("\n%s: %d prompt + %d completion tokens\n", msg.ResponseMeta.FinishReason, u.PromptTokens, u.CompletionTokens)
			continue
		}
		fmt.Printf("[%s]", msg.Content)
	}
	// Output:
	// [,][ there][ was][ a][ little][ g][ir][l]
	// length: 5 prompt + 8 completion tokens
}
