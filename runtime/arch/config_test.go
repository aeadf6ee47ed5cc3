package arch

import (
	"math"
	"testing"

	"github.com/stretchr/testify/require"
)

// gemma's settings are read as llama.cpp's loader reads them: defaults per
// architecture, the GGUF's keys where present.
func TestParseGemma(t *testing.T) {
	base := func(a string, layers int, extra map[string]any) Getter {
		kv := map[string]any{
			"general.architecture":                  a,
			a + ".block_count":                      uint32(layers),
			a + ".embedding_length":                 uint32(256),
			a + ".attention.head_count":             uint32(8),
			a + ".attention.head_count_kv":          uint32(2),
			a + ".attention.key_length":             uint32(32),
			a + ".feed_forward_length":              uint32(512),
			a + ".rope.freq_base":                   float32(1e6),
			a + ".attention.layer_norm_rms_epsilon": float32(1e-6),
		}
		for k, v := range extra {
			kv[a+"."+k] = v
		}
		return func(key string) (any, bool) { v, ok := kv[key]; return v, ok }
	}
	inv := func(x float32) float32 { return 1 / float32(math.Sqrt(float64(x))) }
	cases := []struct {
		name     string
		get      Getter
		err      string
		window   int
		windowed []int
		attnCap  float32
		finalCap float32
		qscale   float32
		rope     map[int][2]float32 // layer -> base, scale
	}{
		{name: "gemma2 defaults", get: base("gemma2", 4, nil), window: 4096, windowed: []int{0, 2},
			attnCap: 50, finalCap: 30, qscale: inv(32), rope: map[int][2]float32{0: {1e6, 1}, 1: {1e6, 1}}},
		{name: "gemma2 keys", get: base("gemma2", 4, map[string]any{"attention.sliding_window": uint32(64),
			"attn_logit_softcapping": float32(5), "final_logit_softcapping": float32(8)}),
			window: 64, windowed: []int{0, 2}, attnCap: 5, finalCap: 8, qscale: inv(32)},
		{name: "gemma2 27B scales queries by hidden/heads", get: base("gemma2", 46, map[string]any{"attention.key_length": uint32(64)}),
			window: 4096, attnCap: 50, finalCap: 30, qscale: inv(32)},
		{name: "gemma2 9B scales queries by head dimension", get: base("gemma2", 42, map[string]any{"attention.key_length": uint32(64)}),
			window: 4096, attnCap: 50, finalCap: 30, qscale: inv(64)},
		{name: "query_pre_attn_scalar", get: base("gemma2", 4, map[string]any{"attention.query_pre_attn_scalar": float32(144)}),
			window: 4096, windowed: []int{0, 2}, attnCap: 50, finalCap: 30, qscale: inv(144)},
		{name: "gemma3 five local, one global", get: base("gemma3", 7, map[string]any{"attention.sliding_window": uint32(64),
			"rope.scaling.type": "linear", "rope.scaling.factor": float32(8)}),
			window: 64, windowed: []int{0, 1, 2, 3, 4, 6}, qscale: inv(32),
			rope: map[int][2]float32{0: {10000, 1}, 5: {1e6, 0.125}, 6: {10000, 1}}},
		{name: "gemma3 without a window is global", get: base("gemma3", 6, nil), qscale: inv(32),
			rope: map[int][2]float32{0: {1e6, 1}}},
		{name: "gemma3 pattern key", get: base("gemma3", 4, map[string]any{"attention.sliding_window": uint32(64),
			"attention.sliding_window_pattern": uint32(2)}), window: 64, windowed: []int{0, 2}, qscale: inv(32)},
		{name: "window of one", get: base("gemma3", 4, map[string]any{"attention.sliding_window": uint32(1)}),
			err: "gemma3.attention.sliding_window 1 is not supported"},
		{name: "pattern out of range", get: base("gemma3", 4, map[string]any{"attention.sliding_window": uint32(64),
			"attention.sliding_window_pattern": uint32(9)}), err: "sliding_window_pattern 9 is outside 1..4"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := parseHParams(c.get)
			if c.err != "" {
				require.ErrorContains(t, err, c.err)
				return
			}
			require.NoError(t, err)
			require.True(t, cfg.Gemma && cfg.RopeNeoX)
			require.Equal(t, cfg.Arch == "gemma3", cfg.QKNorm)
			require.Equal(t, c.window, cfg.SlidingWindow)
			if c.windowed != nil {
				require.Equal(t, c.windowed, cfg.WindowedLayers())
			}
			require.Equal(t, c.attnCap, cfg.AttnSoftcap)
			require.Equal(t, c.finalCap, cfg.FinalSoftcap)
			require.Equal(t, c.qscale, cfg.QueryScale)
			for l, want := range c.rope {
				b, s := cfg.Rope(l)
				require.Equal(t, want, [2]float32{b, s}, "layer %d", l)
			}
		})
	}
}
