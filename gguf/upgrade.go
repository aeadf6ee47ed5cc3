package gguf

import (
	"fmt"
	"io"
	"os"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// Upgrade re-encodes the GGUF file in (any version) as GGUF v3 at out, with
// the same metadata and tensor bytes. llama.cpp and ollama's reader refuse v1
// files; the v3 copy loads in both. The output appears atomically.
func Upgrade(in, out string) error { return Copy(in, out, nil) }

// Edit may change the metadata and the tensor list of a Copy.
type Edit func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error)

// Copy writes in as GGUF v3 at out, after edit (if not nil) has changed its
// metadata or tensors.
func Copy(in, out string, edit Edit) error {
	f, err := Open(in)
	if err != nil {
		return err
	}
	kv := fsggml.KV{}
	for _, p := range f.KVs {
		v, err := writable(p)
		if err != nil {
			return &Error{Path: in, Problem: err.Error(), Err: ErrFormat}
		}
		kv[p.Key] = v
	}
	if f.Architecture() == "" {
		return formatErr(in, "general.architecture is missing")
	}
	src, err := os.Open(in)
	if err != nil {
		return err
	}
	defer src.Close()
	ts := make([]*fsggml.Tensor, len(f.Tensors))
	for i, t := range f.Tensors {
		ts[i] = &fsggml.Tensor{
			Name:     t.Name,
			Kind:     t.Kind,
			Shape:    append([]uint64(nil), t.Shape...),
			WriterTo: section{src, f.DataOffset + int64(t.Offset), int64(t.Bytes())},
		}
	}
	if edit != nil {
		if ts, err = edit(kv, ts); err != nil {
			return err
		}
	}
	return atomicfile.Write(out, 0o644, func(w *os.File) error {
		return fsggml.WriteGGUF(w, kv, ts)
	})
}

// section copies n bytes at off of r; ReadAt makes it safe to run many at once.
type section struct {
	r   io.ReaderAt
	off int64
	n   int64
}

func (s section) WriteTo(w io.Writer) (int64, error) {
	return io.Copy(w, io.NewSectionReader(s.r, s.off, s.n))
}

// writable converts a value to a type that ollama's GGUF writer stores with the
// same GGUF type. Types it cannot store are refused rather than silently changed.
func writable(p KV) (any, error) {
	switch v := p.Value.(type) {
	case uint32, int32, uint64, int64, float32, bool, string,
		[]uint32, []int32, []int64, []float32, []bool, []string:
		return v, nil
	}
	return nil, fmt.Errorf("metadata %q has type %T, which the v3 writer cannot store", p.Key, p.Value)
}
