package server

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	ollama "github.com/ollama/ollama/api"
	"github.com/ollama/ollama/types/model"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/shared"
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

// The official clients send tools, tool choices and output formats in
// their own shapes and read back the calls and the JSON.
func TestClientsToolsAndFormats(t *testing.T) {
	fx := newStoriesFixture(t)
	ctx := context.Background()
	weather := shared.FunctionDefinitionParam{Name: "get_weather", Description: openai.String("Weather in a city"),
		Parameters: shared.FunctionParameters{"type": "object", "additionalProperties": false, "required": []string{"city"},
			"properties": map[string]any{"city": map[string]any{"type": "string", "minLength": 1, "maxLength": 12}}}}
	var hero map[string]any
	require.NoError(t, json.Unmarshal(heroSchema, &hero))

	t.Run("openai", func(t *testing.T) {
		client := openai.NewClient(option.WithBaseURL(fx.ts.URL+"/v1/"), option.WithMaxRetries(0))
		params := openai.ChatCompletionNewParams{
			Model:       "stories",
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Once upon a time")},
			Temperature: openai.Float(0),
			MaxTokens:   openai.Int(160),
			Tools:       []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(weather)},
			ToolChoice:  openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "get_weather"}),
		}
		res, err := client.Chat.Completions.New(ctx, params)
		require.NoError(t, err)
		c := res.Choices[0]
		require.Equal(t, "tool_calls", c.FinishReason)
		require.Len(t, c.Message.ToolCalls, 1)
		call := c.Message.ToolCalls[0]
		require.Equal(t, "get_weather", call.Function.Name)
		var args struct{ City string }
		require.NoError(t, json.Unmarshal([]byte(call.Function.Arguments), &args))
		require.NotEmpty(t, args.City)

		stream := client.Chat.Completions.NewStreaming(ctx, params)
		acc := openai.ChatCompletionAccumulator{}
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		require.NoError(t, stream.Err())
		require.Len(t, acc.Choices[0].Message.ToolCalls, 1)
		require.Equal(t, call.Function.Arguments, acc.Choices[0].Message.ToolCalls[0].Function.Arguments, "streamed and not, greedy: the same call")
		require.Equal(t, "tool_calls", acc.Choices[0].FinishReason)

		res, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model:       "stories",
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Once upon a time")},
			Temperature: openai.Float(0),
			ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "hero", Schema: hero}}},
		})
		require.NoError(t, err)
		require.NoError(t, validHero(res.Choices[0].Message.Content))
	})

	t.Run("ollama", func(t *testing.T) {
		u, err := url.Parse(fx.ts.URL)
		require.NoError(t, err)
		client := ollama.NewClient(u, http.DefaultClient)
		var text strings.Builder
		err = client.Chat(ctx, &ollama.ChatRequest{Model: "stories", Format: heroSchema, Options: map[string]any{"temperature": 0},
			Messages: []ollama.Message{{Role: "user", Content: "Once upon a time"}}}, func(r ollama.ChatResponse) error {
			text.WriteString(r.Message.Content)
			return nil
		})
		require.NoError(t, err)
		require.NoError(t, validHero(text.String()), "%q", text.String())

		// Ollama's client sends tools; the stories model answers in prose.
		var tools ollama.Tools
		require.NoError(t, json.Unmarshal([]byte(`[{"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{}}}}]`), &tools))
		var final ollama.ChatResponse
		err = client.Chat(ctx, &ollama.ChatRequest{Model: "stories", Tools: tools, Options: map[string]any{"temperature": 0, "num_predict": 12},
			Messages: []ollama.Message{{Role: "user", Content: "Once upon a time"}}}, func(r ollama.ChatResponse) error {
			if r.Done {
				final = r
			}
			return nil
		})
		require.NoError(t, err)
		require.Empty(t, final.Message.ToolCalls)
		show, err := client.Show(ctx, &ollama.ShowRequest{Model: "stories"})
		require.NoError(t, err)
		require.Contains(t, show.Capabilities, model.CapabilityTools)
	})
}
