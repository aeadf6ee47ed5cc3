package server

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"

	ollama "github.com/ollama/ollama/api"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

// The official OpenAI Go client talks to our OpenAI routes.
func TestOpenAIClient(t *testing.T) {
	fx := newFixture(t, Config{APIKey: "k"}, "")
	client := openai.NewClient(option.WithBaseURL(fx.ts.URL+"/v1/"), option.WithAPIKey("k"), option.WithMaxRetries(0))
	ctx := context.Background()
	prompt := fx.text + " " + fx.question

	models, err := client.Models.List(ctx)
	require.NoError(t, err)
	require.Len(t, models.Data, 1)
	require.Equal(t, "recall", models.Data[0].ID)

	chat, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:       "recall",
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt)},
		Temperature: openai.Float(0),
		MaxTokens:   openai.Int(3),
	})
	require.NoError(t, err)
	require.Equal(t, " "+fx.answer, chat.Choices[0].Message.Content)
	require.EqualValues(t, 3, chat.Usage.CompletionTokens)

	stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:         "recall",
		Messages:      []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt)},
		Temperature:   openai.Float(0),
		MaxTokens:     openai.Int(3),
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	acc := openai.ChatCompletionAccumulator{}
	for stream.Next() {
		acc.AddChunk(stream.Current())
	}
	require.NoError(t, stream.Err())
	require.Equal(t, " "+fx.answer, acc.Choices[0].Message.Content)
	require.EqualValues(t, 3, acc.Usage.CompletionTokens, "include_usage delivers usage while streaming")

	comp, err := client.Completions.New(ctx, openai.CompletionNewParams{
		Model:       "recall",
		Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
		Temperature: openai.Float(0),
		MaxTokens:   openai.Int(3),
	})
	require.NoError(t, err)
	require.Equal(t, " "+fx.answer, comp.Choices[0].Text)

	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "other",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")}})
	var apiErr *openai.Error
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusNotFound, apiErr.StatusCode)

	bad := openai.NewClient(option.WithBaseURL(fx.ts.URL+"/v1/"), option.WithAPIKey("wrong"), option.WithMaxRetries(0))
	_, err = bad.Models.List(ctx)
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusUnauthorized, apiErr.StatusCode)
}

// Ollama's own Go client talks to our Ollama routes.
func TestOllamaClient(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	u, err := url.Parse(fx.ts.URL)
	require.NoError(t, err)
	client := ollama.NewClient(u, http.DefaultClient)
	ctx := context.Background()
	prompt := fx.text + " " + fx.question
	opts := map[string]any{"temperature": 0, "num_predict": 3}

	v, err := client.Version(ctx)
	require.NoError(t, err)
	require.Equal(t, Version, v)

	list, err := client.List(ctx)
	require.NoError(t, err)
	require.Equal(t, "recall:latest", list.Models[0].Name)

	show, err := client.Show(ctx, &ollama.ShowRequest{Model: "recall"})
	require.NoError(t, err)
	require.Equal(t, "gguf", show.Details.Format)

	var text strings.Builder
	var final ollama.GenerateResponse
	err = client.Generate(ctx, &ollama.GenerateRequest{Model: "recall", Prompt: prompt, Options: opts}, func(r ollama.GenerateResponse) error {
		text.WriteString(r.Response)
		if r.Done {
			final = r
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, " "+fx.answer, text.String())
	require.Equal(t, "length", final.DoneReason)
	require.Equal(t, 3, final.EvalCount)
	require.Positive(t, final.EvalDuration)

	text.Reset()
	f := false
	err = client.Chat(ctx, &ollama.ChatRequest{Model: "recall", Stream: &f, Options: opts,
		Messages: []ollama.Message{{Role: "user", Content: prompt}}}, func(r ollama.ChatResponse) error {
		text.WriteString(r.Message.Content)
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, " "+fx.answer, text.String())

	err = client.Generate(ctx, &ollama.GenerateRequest{Model: "llama9", Prompt: "x"}, func(ollama.GenerateResponse) error { return nil })
	require.Error(t, err)
	require.Contains(t, err.Error(), "llama9")
}
