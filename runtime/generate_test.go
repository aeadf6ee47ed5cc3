package runtime_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func openStories(t *testing.T, o runtime.Options) *runtime.Model {
	t.Helper()
	if o.Threads == 0 {
		o.Threads = 1
	}
	if o.ContextLength == 0 {
		o.ContextLength = 512
	}
	m, err := runtime.Open(context.Background(), testmodels.StoriesV3(t), o)
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

func TestGenerateStops(t *testing.T) {
	m := openStories(t, runtime.Options{})
	ctx := context.Background()
	free, err := m.Generate(ctx, "Once upon a time", runtime.GenerateOptions{MaxTokens: 60})
	require.NoError(t, err)
	require.Equal(t, runtime.StopLength, free.StopReason)
	require.Equal(t, 60, free.GeneratedTokens)
	require.Len(t, free.Tokens, 60)
	require.Greater(t, free.PromptTokens, 3)

	// A stop string that the free run produces ends generation before it.
	i := strings.Index(free.Text, "Lily")
	require.Greater(t, i, 0, "free text %q", free.Text)
	var streamed strings.Builder
	res, err := m.Generate(ctx, "Once upon a time", runtime.GenerateOptions{
		MaxTokens: 60, Stop: []string{"Lily", "never appears"},
		OnToken: func(tok runtime.Token) error { streamed.WriteString(tok.Text); return nil },
	})
	require.NoError(t, err)
	require.Equal(t, runtime.StopString, res.StopReason)
	require.Equal(t, free.Text[:i], res.Text)
	require.Equal(t, res.Text, streamed.String(), "streamed pieces add up to the text")
	require.NotContains(t, streamed.String(), "Lil", "a partial stop string is never streamed")

	// A full context ends generation.
	small := openStories(t, runtime.Options{ContextLength: 16})
	res, err = small.Generate(ctx, "Once upon a time", runtime.GenerateOptions{})
	require.NoError(t, err)
	require.Equal(t, runtime.StopContext, res.StopReason)
	// The last token is sampled from the 16th position's logits; it is
	// returned but there is no room to cache it.
	require.Equal(t, 17, res.PromptTokens+res.GeneratedTokens)

	_, err = m.Generate(ctx, "x", runtime.GenerateOptions{Stop: []string{""}})
	require.ErrorContains(t, err, "empty stop string")
}

func TestGenerateCancellation(t *testing.T) {
	m := openStories(t, runtime.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	res, err := m.Generate(ctx, "Once upon a time", runtime.GenerateOptions{MaxTokens: 100, OnToken: func(runtime.Token) error {
		n++
		if n == 5 {
			cancel()
		}
		return nil
	}})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, runtime.StopCancelled, res.StopReason)
	require.Equal(t, 5, res.GeneratedTokens)

	// A cancelled context stops prefill between batches too.
	m2 := openStories(t, runtime.Options{BatchSize: 4})
	ctx2, cancel2 := context.WithCancel(context.Background())
	calls := 0
	_, err = m2.Generate(ctx2, strings.Repeat("The cat sat on the mat. ", 10), runtime.GenerateOptions{
		OnPrefill: func(done, total int) {
			calls++
			if calls == 2 {
				cancel2()
			}
		},
	})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 2, calls)

	// An error from the callback stops generation and is returned.
	boom := errors.New("client went away")
	res, err = m.Generate(context.Background(), "Once", runtime.GenerateOptions{MaxTokens: 50, OnToken: func(runtime.Token) error { return boom }})
	require.ErrorIs(t, err, boom)
	require.Equal(t, 1, res.GeneratedTokens)
}

func TestGenerateProgressAndStream(t *testing.T) {
	m := openStories(t, runtime.Options{BatchSize: 8})
	prompt := "Once upon a time, there was a little girl named Lily. She loved to play outside."
	ids, err := m.Tokenizer().Encode(prompt, true)
	require.NoError(t, err)
	var seen []int
	res, err := m.Generate(context.Background(), prompt, runtime.GenerateOptions{MaxTokens: 4, OnPrefill: func(done, total int) {
		require.Equal(t, len(ids), total)
		seen = append(seen, done)
	}})
	require.NoError(t, err)
	require.Equal(t, len(ids), res.PromptTokens)
	require.Len(t, seen, (len(ids)+7)/8)
	require.Equal(t, len(ids), seen[len(seen)-1])
	require.Positive(t, res.PrefillTokensPerSecond())
	require.Positive(t, res.DecodeTokensPerSecond())

	var got []runtime.Token
	for tok, err := range m.Stream(context.Background(), "Once upon a time", runtime.GenerateOptions{MaxTokens: 30}) {
		require.NoError(t, err)
		got = append(got, tok)
		if len(got) == 3 {
			break // the iterator must stop cleanly
		}
	}
	require.Len(t, got, 3)
}

func TestSamplingIsSeeded(t *testing.T) {
	m := openStories(t, runtime.Options{})
	gen := func(s runtime.Sampling) []int32 {
		res, err := m.Generate(context.Background(), "Once upon a time", runtime.GenerateOptions{MaxTokens: 40, Sampling: s})
		require.NoError(t, err)
		return res.Tokens
	}
	hot := runtime.Sampling{Temperature: 1.2, TopK: 40, TopP: 0.95, MinP: 0.01, Seed: 42}
	a, b := gen(hot), gen(hot)
	require.Equal(t, a, b, "same seed, same tokens")
	hot.Seed = 43
	require.NotEqual(t, a, gen(hot), "another seed, other tokens")
	greedy := gen(runtime.Sampling{})
	require.NotEqual(t, a, greedy)
	// A strong repeat penalty changes greedy output of a repetitive model.
	require.NotEqual(t, greedy, gen(runtime.Sampling{RepeatPenalty: 3, RepeatLastN: 64}))
}
