package foundry

import (
	"path/filepath"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
)

// Quantized random models carry the types asked for, tensor by tensor:
// vectors stay f32, Q4_K_M follows llama.cpp's recipe.
func TestQuantizedTypes(t *testing.T) {
	q4, q6 := uint32(fsggml.TensorTypeQ4_K), uint32(fsggml.TensorTypeQ6_K)
	cases := []struct {
		dtype DType
		want  map[string]uint32
	}{
		{Q4_0, map[string]uint32{"blk.0.attn_q.weight": uint32(fsggml.TensorTypeQ4_0), "blk.0.attn_norm.weight": uint32(fsggml.TensorTypeF32)}},
		{Q8_0, map[string]uint32{"blk.1.ffn_down.weight": uint32(fsggml.TensorTypeQ8_0)}},
		{Q4_K, map[string]uint32{"blk.0.attn_q.weight": q4, "output.weight": q4}},
		{Q5_K, map[string]uint32{"blk.3.ffn_up.weight": uint32(fsggml.TensorTypeQ5_K)}},
		{Q6_K, map[string]uint32{"token_embd.weight": q6}},
		// 4 layers: more bits for attn_v and ffn_down in layer 3 (the last
		// eighth) and layer 2 ((2 - 0) % 3 == 2), and for output.weight.
		{Q4_K_M, map[string]uint32{"output.weight": q6, "blk.0.attn_v.weight": q4, "blk.1.ffn_down.weight": q4,
			"blk.2.attn_v.weight": q6, "blk.3.ffn_down.weight": q6, "blk.3.attn_q.weight": q4}},
	}
	for _, c := range cases {
		t.Run(string(c.dtype), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "m.gguf")
			require.NoError(t, WriteRandom(path, RandomOptions{Arch: "llama", Shape: Presets["tiny"], DType: c.dtype, Seed: 1}))
			f, err := gguf.Open(path)
			require.NoError(t, err)
			for name, kind := range c.want {
				tt, ok := f.Tensor(name)
				require.True(t, ok, name)
				require.Equal(t, kind, tt.Kind, name)
			}
		})
	}
	_, err := ParseDType("q3_k")
	require.ErrorContains(t, err, "q4_k_m")
}
