package paging

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The lagged rule of in-graph scoring (GraphScored): the first decode step
// after a question keeps the question's pages; later steps take the best
// pages by the previous step's bounds, with the pages held getting
// KeepLogits·√headDim (a challenger must beat the weakest held page by
// more than that); a budget that holds every page selects every page.
func TestLaggedGraphSelection(t *testing.T) {
	const P, hd = 64, 16
	// upto 1280: 20 pages; sinks (page 0) and window (pages 18, 19)
	// required; a budget of 8 pages leaves 5.
	newQuest := func(t *testing.T, keep float64, budget int) Selector {
		s, err := New("quest", Config{PageSize: P, Budget: budget, Sinks: 64, Window: 128,
			Options: map[string]any{KeepLogits: keep}})
		require.NoError(t, err)
		require.True(t, s.(GraphScored).UseGraphScores())
		return s
	}
	// fake boxes of radius 0: a page's bound is q·key; q is e_0 per head.
	f := newFake(21, 1, hd)
	for p, v := range map[int]float32{3: 9, 5: 8, 7: 7, 9: 6, 11: 5, 12: 1} {
		f.keys[p][0][0] = v
	}
	q := make([]float32, 2*hd)
	q[0], q[hd] = 1, 1
	question := func(t *testing.T, s Selector) {
		require.True(t, s.NeedQueries(0, 8), "a question is scored on the host, exactly")
		got := s.Select(0, f, &Queries{Q: [][]float32{q}, Heads: 2}, 1280)
		require.Equal(t, []int{0, 3, 5, 7, 9, 11, 18, 19}, got.Groups[0])
		require.False(t, s.NeedQueries(0, 1), "a decode step needs no queries on the host")
	}
	scores := func(m map[int]float32) []float32 {
		out := make([]float32, 21)
		for p, v := range m {
			out[p] = v
		}
		return out
	}
	t.Run("first decode step keeps the question's pages", func(t *testing.T) {
		s := newQuest(t, 0, 8*P)
		question(t, s)
		// upto 1281 adds page 20 to the window: 4 pages free.
		got := s.Select(0, f, nil, 1281)
		require.Equal(t, []int{0, 3, 5, 7, 9, 18, 19, 20}, got.Groups[0])
	})
	t.Run("keep 0 takes the lagged top pages", func(t *testing.T) {
		s := newQuest(t, 0, 8*P)
		question(t, s)
		s.(GraphScored).Scored(0, scores(map[int]float32{2: 5, 4: 4, 6: 3, 8: 2, 3: 1, 18: 99}), 1281)
		got := s.Select(0, f, nil, 1282)
		require.Equal(t, []int{0, 2, 4, 6, 8, 18, 19, 20}, got.Groups[0])
	})
	t.Run("held pages resist challengers within the margin", func(t *testing.T) {
		s := newQuest(t, 1, 8*P) // margin 1·√16 = 4
		question(t, s)
		s.Select(0, f, nil, 1281) // holds 3, 5, 7, 9
		held := map[int]float32{3: 10, 5: 10, 7: 10, 9: 9.5}
		m := maps(held, 12, 13) // 3.5 above page 9: stays out
		s.(GraphScored).Scored(0, scores(m), 1281)
		require.Equal(t, []int{0, 3, 5, 7, 9, 18, 19, 20}, s.Select(0, f, nil, 1282).Groups[0])
		m = maps(held, 12, 14) // 4.5 above page 9: replaces it
		s.(GraphScored).Scored(0, scores(m), 1282)
		require.Equal(t, []int{0, 3, 5, 7, 12, 18, 19, 20}, s.Select(0, f, nil, 1283).Groups[0])
	})
	t.Run("a budget holding every page selects every page", func(t *testing.T) {
		s := newQuest(t, 0, 64*P)
		require.False(t, s.(GraphScored).GraphScores(0, 1, 1281), "nothing to score")
		require.Equal(t, AllPages(21), s.Select(0, f, nil, 1281).Groups[0])
	})
	t.Run("host scores keep the split", func(t *testing.T) {
		s, err := New("quest", Config{PageSize: P, Budget: 8 * P, Sinks: 64, Window: 128,
			Options: map[string]any{HostScores: true}})
		require.NoError(t, err)
		require.False(t, s.(GraphScored).UseGraphScores())
		require.True(t, s.NeedQueries(0, 1))
	})
	t.Run("retro does not score in the graph", func(t *testing.T) {
		s, err := New("retro", Config{PageSize: P, Budget: 8 * P, Sinks: 64, Window: 128})
		require.NoError(t, err)
		require.False(t, s.(GraphScored).UseGraphScores())
	})
}

// maps returns a copy of m with page p set to v.
func maps(m map[int]float32, p int, v float32) map[int]float32 {
	out := map[int]float32{p: v}
	for k, x := range m {
		if k != p {
			out[k] = x
		}
	}
	return out
}
