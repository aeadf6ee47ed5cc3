package runtime_test

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestTokenizerRoundTripStories(t *testing.T) {
	path := testmodels.StoriesV3(t)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, Context: 512})
	require.NoError(t, err)
	defer ref.Close()
	texts := []string{
		"Once upon a time, there was a little girl named Lily.",
		"She loved to play outside in the park. \"Look!\" she said, \"a big, red ball!\"",
		"Tim and Sue went to the shop.\nThey bought 3 apples and 12 eggs.",
		"  two leading spaces and trailing ones  ",
		"café, naïve, 😀 and 漢字 fall back to bytes",
		"x",
	}
	for _, text := range texts {
		t.Run(text[:min(len(text), 20)], func(t *testing.T) {
			ids, err := m.Tokenizer().Encode(text, false)
			require.NoError(t, err)
			want, err := ref.Tokenize(text, false)
			require.NoError(t, err)
			require.Equal(t, want, ids, "same ids as llama.cpp")
			back, err := m.Tokenizer().Decode(ids)
			require.NoError(t, err)
			require.Equal(t, " "+text, back, "decode(encode(text)) is text with SentencePiece's space prefix")
			withBOS, err := m.Tokenizer().Encode(text, true)
			require.NoError(t, err)
			require.Equal(t, int32(1), withBOS[0])
			require.Equal(t, ids, withBOS[1:])
		})
	}
	_, err = m.Tokenizer().Decode([]int32{5000})
	require.ErrorContains(t, err, "outside the vocabulary")
}

// Greedy generation from the pretrained stories model gives readable English,
// the same text llama.cpp gives.
func TestStoriesGeneratesReadableText(t *testing.T) {
	path := testmodels.StoriesV3(t)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	res, err := m.Generate(context.Background(), "Once upon a time", runtime.GenerateOptions{MaxTokens: 80})
	require.NoError(t, err)
	t.Logf("%q", res.Text)
	words := strings.Fields(res.Text)
	require.GreaterOrEqual(t, len(words), 30)
	plain := 0
	for _, w := range words {
		w = strings.TrimFunc(w, unicode.IsPunct)
		if w != "" && strings.IndexFunc(w, func(r rune) bool { return !unicode.IsLetter(r) }) < 0 {
			plain++
		}
	}
	require.Greater(t, float64(plain)/float64(len(words)), 0.9, "mostly plain words")
	for _, w := range []string{" the ", " was ", " a "} {
		require.Contains(t, res.Text, w)
	}

	ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, Context: 512})
	require.NoError(t, err)
	defer ref.Close()
	prompt, _ := ref.Tokenize("Once upon a time", true)
	want, err := ref.Greedy(prompt, 80)
	require.NoError(t, err)
	require.Equal(t, want, res.Tokens)
}

// EncodeLimit gives Encode's ids when they fit and refuses text over the
// limit; a text far over it is refused without being tokenized, so its cost
// does not grow with the text.
func TestEncodeLimit(t *testing.T) {
	m := openStories(t, runtime.Options{})
	tok := m.Tokenizer()
	text := "Once upon a time, there was a little girl named Lily."
	all, err := tok.Encode(text, true)
	require.NoError(t, err)
	huge := strings.Repeat("Once upon a time. ", 1<<20) // 18 MiB
	cases := []struct {
		name    string
		text    string
		limit   int
		want    []int32
		atLeast int // 0: no error expected
	}{
		{"fits", text, 100, all, 0},
		{"exactly the limit", text, len(all), all, 0},
		{"one over", text, len(all) - 1, nil, len(all)},
		{"empty", "", 0, nil, 0},
		{"huge", huge, 1000, nil, 1000},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			ids, err := tok.EncodeLimit(c.text, c.text != "", c.limit)
			if c.atLeast == 0 {
				require.NoError(t, err)
				require.Equal(t, c.want, ids)
				return
			}
			var tm *runtime.TooManyTokensError
			require.ErrorAs(t, err, &tm)
			require.Equal(t, c.limit, tm.Limit)
			require.Greater(t, tm.AtLeast, c.limit)
			require.GreaterOrEqual(t, tm.AtLeast, c.atLeast)
			require.Less(t, time.Since(start), time.Second, "refused without tokenizing the whole text")
		})
	}
	_, err = tok.EncodeLimit(text, true, -1)
	require.ErrorContains(t, err, "negative")
}
