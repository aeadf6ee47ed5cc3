package kvrecall_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/internal/redistest"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// Options.Store: a second Model with its own data directory answers a
// document the first ingested, fetched from Redis, without prefill (Usage
// counts the document as cached); a bad URL is an error naming the option.
func TestStoreOption(t *testing.T) {
	ctx := context.Background()
	r := redistest.Start(t)
	_, err := kvrecall.Open(ctx, testmodels.Recall(t), kvrecall.Options{Store: "memcached://x"})
	require.ErrorContains(t, err, "Options.Store")

	fx := newHaystack(t, t.TempDir(), 2048, []float64{0.5})
	fx.m.Close()
	open := func() *kvrecall.Model {
		m, err := kvrecall.Open(ctx, testmodels.Recall(t), kvrecall.Options{Threads: 2, ContextLength: 2048 + 64, DataDir: t.TempDir(), Store: r.URL})
		require.NoError(t, err)
		t.Cleanup(func() { m.Close() })
		return m
	}
	a, b := open(), open()
	doc, err := a.Ingest(ctx, "hay", fx.text, kvrecall.IngestOptions{})
	require.NoError(t, err)
	require.False(t, doc.Info().FromStore)

	got, err := b.Document("hay")
	require.NoError(t, err)
	require.True(t, got.Info().FromStore, "fetched, not prefilled")
	require.Equal(t, doc.Info().Tokens, got.Info().Tokens)
	res, err := got.Ask(ctx, fx.questions[0], kvrecall.GenerateOptions{MaxTokens: 3})
	require.NoError(t, err)
	require.Equal(t, fx.answer[0], res.Text)
	require.Equal(t, fx.docTokens, res.Usage.CachedTokens, "the document's tokens were not evaluated")
}
