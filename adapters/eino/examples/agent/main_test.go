package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/testmodels"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

// The agent, briefly, on its default (the recall model with its template,
// built in a temporary models folder): every question goes through the
// forced tool call and is answered from the document; every model call
// reuses the whole document and evaluates only a few dozen tokens.
func TestAgent(t *testing.T) {
	var out bytes.Buffer
	const length = 2048
	qs, err := run(context.Background(), config{Length: length, Needles: 3, Seed: 7, Threads: 2, Method: "retro", Budget: 512,
		Force: true, ModelsDir: t.TempDir()}, &out)
	require.NoError(t, err, out.String())
	t.Log("\n" + out.String())
	require.Len(t, qs, 3)
	seen := map[string]bool{}
	for i, q := range qs {
		require.NotEmpty(t, q.Question, "question %d came from the tool", i)
		require.False(t, seen[q.Question], "the tool hands out each question once")
		seen[q.Question] = true
		require.Equal(t, q.Want, q.Answer, "question %d", i)
		require.Len(t, q.Calls, 2, "a tool step, then the answer")
		require.Positive(t, q.FirstToken)
		require.Greater(t, q.FirstToken, q.ToolStep, "the answer starts after the tool's result")
		for _, u := range q.Calls {
			require.Equal(t, length, u.CachedTokens, "the whole document reused")
			require.Less(t, u.PromptTokens-u.CachedTokens, 100, "only the chat turns evaluated")
			require.Positive(t, u.CompletionTokens)
		}
	}
	for _, s := range []string{"Ingested haystack.txt once: 2048 tokens", "time to first token", "No question prefilled the document again"} {
		require.Contains(t, out.String(), s)
	}
	require.Equal(t, 3, strings.Count(out.String(), "(correct)"))
}
