package runtime_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/runtime"
)

// With full attention, the recall model answers every needle exactly, in our
// engine and in llama.cpp: 1k, 4k and 16k tokens, depths 0-100 %, one needle
// or eight clustered around the depth (each asked in turn).
func TestNeedleFullAttention(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)

	const maxLen = 16384
	ctx := context.Background()
	ours, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: maxLen + 16})
	require.NoError(t, err)
	defer ours.Close()
	ref, err := llamaref.Load(path, llamaref.Options{Threads: 2, Context: maxLen + 16})
	require.NoError(t, err)
	defer ref.Close()

	for _, length := range []int{1024, 4096, maxLen} {
		for _, depth := range []int{0, 25, 50, 75, 100} {
			for _, needles := range []int{1, 8} {
				t.Run(fmt.Sprintf("%d/%d%%/%dneedles", length, depth, needles), func(t *testing.T) {
					d := float64(depth) / 100
					depths := []float64{d}
					if needles > 1 {
						depths = haystack.Cluster(d, needles, 1.0/32)
					}
					c, err := voc.NewCase(length, depths, uint64(length*1000+depth*10+needles))
					require.NoError(t, err)
					require.Len(t, c.Tokens, length)

					s, err := ours.NewSession()
					require.NoError(t, err)
					defer s.Close()
					_, err = s.Eval(ctx, c.Tokens, false, nil)
					require.NoError(t, err)
					ref.Reset()
					_, err = ref.Append(c.Tokens, false, nil)
					require.NoError(t, err)

					for _, n := range c.Needles {
						q := voc.Question(n)
						res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
						require.NoError(t, err)
						require.Equal(t, n.Values, res.Tokens, "ours: needle at depth %.3f (position %d)", n.Depth, n.Pos)
						require.NoError(t, s.Truncate(length))

						got, err := ref.Continue(q, voc.AnswerLength)
						require.NoError(t, err)
						require.Equal(t, n.Values, got, "llama.cpp: needle at depth %.3f (position %d)", n.Depth, n.Pos)
						require.NoError(t, ref.Truncate(length))
					}
				})
			}
		}
	}
}

// The recall vocabulary is word-level: a haystack written out as text must
// tokenize back to the same ids in both tokenizers.
func TestRecallPromptsAreText(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(512, []float64{0.3, 0.7}, 5)
	require.NoError(t, err)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 1024})
	require.NoError(t, err)
	defer m.Close()
	text, err := m.Tokenizer().Decode(c.Tokens[1:])
	require.NoError(t, err)
	require.NotContains(t, text, "<0x", "every word is a whole token")
	ids, err := m.Tokenizer().Encode(text[1:], true) // drop the decoded leading space
	require.NoError(t, err)
	require.Equal(t, c.Tokens, ids)
	ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, Context: 1024})
	require.NoError(t, err)
	defer ref.Close()
	refIDs, err := ref.Tokenize(text[1:], true)
	require.NoError(t, err)
	require.Equal(t, c.Tokens, refIDs)
}
