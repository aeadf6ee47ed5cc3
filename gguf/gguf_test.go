package gguf_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// builder writes small GGUF files field by field, so tests can break any field.
type builder struct {
	b       bytes.Buffer
	version uint32
}

func (w *builder) u32(v uint32) *builder { binary.Write(&w.b, binary.LittleEndian, v); return w }
func (w *builder) u64(v uint64) *builder { binary.Write(&w.b, binary.LittleEndian, v); return w }
func (w *builder) count(v uint64) *builder {
	if w.version == 1 {
		return w.u32(uint32(v))
	}
	return w.u64(v)
}
func (w *builder) str(s string) *builder { w.count(uint64(len(s))); w.b.WriteString(s); return w }
func (w *builder) kvString(k, v string) *builder {
	return w.str(k).u32(gguf.TypeString).str(v)
}
func (w *builder) kvU32(k string, v uint32) *builder { return w.str(k).u32(gguf.TypeUint32).u32(v) }
func (w *builder) tensor(name string, kind uint32, off uint64, dims ...uint64) *builder {
	w.str(name).u32(uint32(len(dims)))
	for _, d := range dims {
		if w.version == 1 {
			w.u32(uint32(d))
		} else {
			w.u64(d)
		}
	}
	return w.u32(kind).u64(off)
}
func (w *builder) align() *builder {
	for w.b.Len()%32 != 0 {
		w.b.WriteByte(0)
	}
	return w
}
func (w *builder) zeros(n int) *builder { w.b.Write(make([]byte, n)); return w }

func header(version uint32, tensors, kvs uint64) *builder {
	w := &builder{version: version}
	w.b.WriteString("GGUF")
	w.u32(version)
	return w.count(tensors).count(kvs)
}

// valid is a tiny well-formed file: one KV, one f32 tensor [4, 2].
func valid(version uint32) []byte {
	w := header(version, 1, 2).kvString("general.architecture", "llama").kvU32("llama.block_count", 1)
	w.tensor("t.weight", 0, 0, 4, 2).align().zeros(32)
	return w.b.Bytes()
}

func TestReadValid(t *testing.T) {
	for _, v := range []uint32{1, 2, 3} {
		t.Run(string(rune('0'+v)), func(t *testing.T) {
			data := valid(v)
			f, err := gguf.Read(bytes.NewReader(data), int64(len(data)), "mem")
			require.NoError(t, err)
			require.Equal(t, v, f.Version)
			require.Equal(t, "llama", f.Architecture())
			n, ok := f.Uint("llama.block_count")
			require.True(t, ok)
			require.EqualValues(t, 1, n)
			tt, ok := f.Tensor("t.weight")
			require.True(t, ok)
			require.Equal(t, []uint64{4, 2}, tt.Shape)
			require.EqualValues(t, 32, tt.Bytes())
		})
	}
}

func TestReadRejects(t *testing.T) {
	cases := []struct {
		name string
		data func() []byte
		want string
	}{
		{"empty", func() []byte { return nil }, "too short"},
		{"wrong magic", func() []byte { d := valid(3); copy(d, "GGML"); return d }, "wrong magic"},
		{"future version", func() []byte { d := valid(3); d[4] = 9; return d }, "unsupported GGUF version 9"},
		{"truncated header", func() []byte { return valid(3)[:50] }, "truncated"},
		{"truncated data", func() []byte { d := valid(3); return d[:len(d)-8] }, "truncated: tensor \"t.weight\""},
		{"huge kv count", func() []byte { return header(3, 0, 1<<40).b.Bytes() }, "metadata pairs"},
		{"huge tensor count", func() []byte { return header(3, 1<<40, 0).b.Bytes() }, "tensors, more than"},
		{"huge string", func() []byte { return header(3, 0, 1).u64(1 << 62).zeros(64).b.Bytes() }, "exceeds"},
		{"huge array", func() []byte {
			return header(3, 0, 1).str("a").u32(gguf.TypeArray).u32(gguf.TypeUint32).u64(1 << 60).b.Bytes()
		}, "claims"},
		{"unknown value type", func() []byte { return header(3, 0, 1).str("a").u32(77).u32(0).b.Bytes() }, "unknown value type"},
		{"unknown element type", func() []byte { return header(3, 0, 1).str("a").u32(gguf.TypeArray).u32(77).u64(1).b.Bytes() }, "unknown element type"},
		{"nested array", func() []byte {
			return header(3, 0, 1).str("a").u32(gguf.TypeArray).u32(gguf.TypeArray).u64(1).b.Bytes()
		}, "arrays"},
		{"duplicate key", func() []byte { return header(3, 0, 2).kvU32("a", 1).kvU32("a", 2).b.Bytes() }, "duplicate metadata key"},
		{"empty key", func() []byte { return header(3, 0, 1).kvU32("", 1).b.Bytes() }, "empty metadata key"},
		{"five dims", func() []byte { return header(3, 1, 0).tensor("t", 0, 0, 1, 1, 1, 1, 1).align().zeros(32).b.Bytes() }, "5 dimensions"},
		{"zero dim", func() []byte { return header(3, 1, 0).tensor("t", 0, 0, 4, 0).align().zeros(32).b.Bytes() }, "zero dimension"},
		{"overflowing shape", func() []byte {
			return header(3, 1, 0).tensor("t", 0, 0, 1<<40, 1<<40).align().b.Bytes()
		}, "overflows"},
		{"unknown tensor type", func() []byte { return header(3, 1, 0).tensor("t", 99, 0, 4).align().zeros(32).b.Bytes() }, "unknown type 99"},
		{"bad block size", func() []byte { return header(3, 1, 0).tensor("t", 8, 0, 33).align().zeros(64).b.Bytes() }, "block size"},
		{"unaligned offset", func() []byte { return header(3, 1, 0).tensor("t", 0, 4, 4).align().zeros(64).b.Bytes() }, "not aligned"},
		{"duplicate tensor", func() []byte {
			return header(3, 2, 0).tensor("t", 0, 0, 4).tensor("t", 0, 32, 4).align().zeros(64).b.Bytes()
		}, "duplicate tensor"},
		{"bad alignment", func() []byte {
			return header(3, 0, 1).kvU32("general.alignment", 3).b.Bytes()
		}, "power of two"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := c.data()
			_, err := gguf.Read(bytes.NewReader(data), int64(len(data)), "bad.gguf")
			require.Error(t, err)
			require.True(t, errors.Is(err, gguf.ErrFormat), "error %v should wrap gguf.ErrFormat", err)
			require.Contains(t, err.Error(), "bad.gguf")
			require.Contains(t, err.Error(), c.want)
		})
	}
}

func TestOpenNamesTheFile(t *testing.T) {
	_, err := gguf.Open(filepath.Join(t.TempDir(), "missing.gguf"))
	require.ErrorContains(t, err, "missing.gguf")
	_, err = gguf.Open(t.TempDir())
	require.ErrorContains(t, err, "directory")
}

// The shared stories260k model is GGUF v1; Upgrade must keep every key,
// value and tensor byte while moving it to v3.
func TestUpgradeKeepsEverything(t *testing.T) {
	src := testmodels.Stories(t)
	in, err := gguf.Open(src)
	require.NoError(t, err)
	require.EqualValues(t, 1, in.Version)
	require.Equal(t, "llama", in.Architecture())
	require.Len(t, in.Tensors, 48)

	dst := filepath.Join(t.TempDir(), "v3.gguf")
	require.NoError(t, gguf.Upgrade(src, dst))
	out, err := gguf.Open(dst)
	require.NoError(t, err)
	require.EqualValues(t, 3, out.Version)
	require.Len(t, out.KVs, len(in.KVs))
	for _, kv := range in.KVs {
		v, ok := out.Get(kv.Key)
		require.True(t, ok, kv.Key)
		require.Equal(t, kv.Value, v, kv.Key)
	}
	a, err := os.ReadFile(src)
	require.NoError(t, err)
	b, err := os.ReadFile(dst)
	require.NoError(t, err)
	for _, ti := range in.Tensors {
		to, ok := out.Tensor(ti.Name)
		require.True(t, ok, ti.Name)
		require.Equal(t, ti.Shape, to.Shape)
		require.Equal(t, ti.Kind, to.Kind)
		x := a[in.DataOffset+int64(ti.Offset):][:ti.Bytes()]
		y := b[out.DataOffset+int64(to.Offset):][:to.Bytes()]
		require.True(t, bytes.Equal(x, y), "tensor %s bytes differ", ti.Name)
	}
}

func TestUpgradeRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.gguf")
	require.NoError(t, os.WriteFile(bad, []byte("GGUF\x03\x00"), 0o644))
	out := filepath.Join(dir, "out.gguf")
	require.ErrorContains(t, gguf.Upgrade(bad, out), "truncated")
	_, err := os.Stat(out)
	require.True(t, os.IsNotExist(err), "no output may appear after a failed upgrade")
	entries, _ := os.ReadDir(dir)
	require.Len(t, entries, 1, "no temporary files may be left behind")
}

// FuzzRead: any bytes give a file or an error, never a panic, and an
// accepted file's tensors lie inside it. Seed corpus: testdata/fuzz/FuzzRead
// plus the valid files above and the shared stories header.
func FuzzRead(f *testing.F) {
	for _, v := range []uint32{1, 2, 3} {
		f.Add(valid(v))
	}
	if root, err := testmodels.RepoRoot(); err == nil {
		if b, err := os.ReadFile(filepath.Join(root, "..", "shared", "models", "stories260k-f32.gguf")); err == nil {
			f.Add(b[:12000]) // the header and the start of the data
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		gf, err := gguf.Read(bytes.NewReader(data), int64(len(data)), "fuzz")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz: ") {
				t.Fatalf("error does not name the input: %v", err)
			}
			return
		}
		for _, tt := range gf.Tensors {
			end := gf.DataOffset + int64(tt.Offset) + int64(tt.Bytes())
			if end > int64(len(data)) {
				t.Fatalf("tensor %s ends at %d beyond %d bytes", tt.Name, end, len(data))
			}
		}
	})
}
