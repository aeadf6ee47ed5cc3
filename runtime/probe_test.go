package runtime_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// Needle in a haystack at 16k with budgets 1024 and 2048: probe answers
// exactly wherever retro does, reports its per-layer budgets, and keeps
// each layer's device pool within its budget.
func TestNeedleProbe(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Salience: true})
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 16384 + 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	const length = 16384
	for _, depth := range []int{10, 50, 90} {
		c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(7*length+depth))
		require.NoError(t, err)
		doc, err := m.IngestTokens(ctx, fmt.Sprintf("probe-%d", depth), c.Tokens, nil)
		require.NoError(t, err)
		n := c.Needles[0]
		q := voc.Question(n)
		for _, budget := range []int{1024, 2048} {
			exact := map[string]bool{}
			for _, policy := range []string{"retro", "probe"} {
				t.Run(fmt.Sprintf("%d%%/%s/%d", depth, policy, budget), func(t *testing.T) {
					t0 := time.Now()
					s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: policy, Budget: budget})
					require.NoError(t, err)
					defer s.Close()
					res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
					require.NoError(t, err)
					exact[policy] = equal(res.Tokens, n.Values)
					t.Logf("needle block %d; %s: got %v want %v, layer budgets %v (%v)", (n.Pos+1)/64, policy, res.Tokens, n.Values, res.LayerBudgets, time.Since(t0))
					if policy != "probe" {
						return
					}
					require.Len(t, res.LayerBudgets, m.Config().Layers)
					pc := s.Cache().(*kvcache.Paged)
					for l, b := range res.LayerBudgets {
						require.Positive(t, b, "layer %d", l)
						// The pool holds the layer's budget, the batch's page and slack.
						require.LessOrEqual(t, pc.ResidentSlots(l)*64, b+4*64, "layer %d pool for budget %d", l, b)
					}
				})
			}
			if exact["retro"] {
				require.True(t, exact["probe"], "depth %d%%, budget %d: retro is exact, probe is not", depth, budget)
			}
		}
	}
}
