package runtime_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// zeroData writes n zero bytes.
type zeroData struct{ n int64 }

func (z zeroData) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(make([]byte, z.n))
	return int64(n), err
}

func TestOpenRejectsBadFiles(t *testing.T) {
	good := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	dir := t.TempDir()
	edit := func(name string, e gguf.Edit) string {
		p := filepath.Join(dir, name)
		require.NoError(t, gguf.Copy(good, p, e))
		return p
	}
	raw := func(name string, f func([]byte) []byte) string {
		b, err := os.ReadFile(good)
		require.NoError(t, err)
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, f(b), 0o644))
		return p
	}
	cases := []struct {
		name string
		path string
		want string
	}{
		{"missing file", filepath.Join(dir, "nope.gguf"), "no such file"},
		{"truncated", raw("truncated.gguf", func(b []byte) []byte { return b[:len(b)/2] }), "truncated"},
		{"wrong magic", raw("magic.gguf", func(b []byte) []byte { copy(b, "PK\x03\x04"); return b }), "wrong magic"},
		{"text file", raw("text.gguf", func([]byte) []byte { return []byte("hello, I am not a model\n") }), "wrong magic"},
		{"unsupported architecture", edit("mamba.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			kv["general.architecture"] = "mamba"
			return ts, nil
		}), `architecture "mamba" is not supported (supported: llama, qwen2, qwen3, phi3, gemma2, gemma3)`},
		{"missing tensor", edit("missing.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			var out []*fsggml.Tensor
			for _, t := range ts {
				if t.Name != "blk.1.attn_k.weight" {
					out = append(out, t)
				}
			}
			return out, nil
		}), "missing tensor blk.1.attn_k.weight"},
		{"shape mismatch", edit("shape.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			for _, t := range ts {
				if t.Name == "blk.0.ffn_up.weight" {
					t.Shape = []uint64{256, 256}
					t.WriterTo = zeroData{256 * 256 * 4}
				}
			}
			return ts, nil
		}), "tensor blk.0.ffn_up.weight has shape [256 256], want [256 512]"},
		{"LongRoPE with long factors only", edit("longrope.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			return append(ts, &fsggml.Tensor{Name: "rope_factors_long.weight", Kind: 0, Shape: []uint64{16}, WriterTo: zeroData{16 * 4}}), nil
		}), "LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight"},
		{"missing hyperparameter", edit("hparam.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			delete(kv, "llama.block_count")
			return ts, nil
		}), "llama.block_count is missing"},
		{"gemma2 without its post-MLP norm", func() string {
			p := filepath.Join(dir, "gemma2-nopost.gguf")
			require.NoError(t, gguf.Copy(testmodels.Random(t, "gemma2", "gemma2-tiny", foundry.F32, 8, false), p,
				func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
					var out []*fsggml.Tensor
					for _, t := range ts {
						if t.Name != "blk.2.post_ffw_norm.weight" {
							out = append(out, t)
						}
					}
					return out, nil
				}))
			return p
		}(), "missing tensor blk.2.post_ffw_norm.weight"},
		{"vocabulary mismatch", edit("vocab.gguf", func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			toks := kv["tokenizer.ggml.tokens"].([]string)
			kv["tokenizer.ggml.tokens"] = toks[:100]
			kv["tokenizer.ggml.scores"] = kv["tokenizer.ggml.scores"].([]float32)[:100]
			kv["tokenizer.ggml.token_type"] = kv["tokenizer.ggml.token_type"].([]int32)[:100]
			return ts, nil
		}), "tokenizer has 100 tokens but token_embd.weight has 512 rows"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m, err := runtime.Open(context.Background(), c.path, runtime.Options{Threads: 1})
			require.Nil(t, m)
			require.Error(t, err)
			require.Contains(t, err.Error(), c.path, "the error must name the file")
			require.Contains(t, err.Error(), c.want)
			var oe *runtime.OpenError
			require.ErrorAs(t, err, &oe)
		})
	}
}

func TestOpenRejectsBadOptions(t *testing.T) {
	p := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	_, err := runtime.Open(context.Background(), p, runtime.Options{KVType: "q4_0"})
	require.ErrorContains(t, err, `KV type "q4_0" is not supported`)
	// Cancellation is checked between batches: a batch may not be so large
	// that a cancelled request (or Close) waits long for it.
	_, err = runtime.Open(context.Background(), p, runtime.Options{BatchSize: runtime.MaxBatchSize + 1})
	require.ErrorContains(t, err, "batch size")
}

// stories260k is GGUF v1, which ollama's reader cannot parse: Open must
// upgrade it transparently (once) and run it.
func TestOpenUpgradesV1(t *testing.T) {
	cache := t.TempDir()
	m, err := runtime.Open(context.Background(), testmodels.Stories(t), runtime.Options{Threads: 1, CacheDir: cache})
	require.NoError(t, err)
	defer m.Close()
	require.Equal(t, "llama", m.Config().Arch)
	require.Equal(t, 512, m.Config().Vocab)
	entries, err := os.ReadDir(cache)
	require.NoError(t, err)
	require.Len(t, entries, 1, "one upgraded copy in the cache directory")
	res, err := m.Generate(context.Background(), "Once upon a time", runtime.GenerateOptions{MaxTokens: 8})
	require.NoError(t, err)
	require.Equal(t, 8, res.GeneratedTokens)
}
