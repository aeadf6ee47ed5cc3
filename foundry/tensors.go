// Package foundry builds GGUF models for tests, benchmarks and the demo, since
// no pretrained model can be downloaded: random llama/qwen2 models of chosen
// shapes, and a constructed associative-recall model that really answers
// needle-in-a-haystack questions over long contexts.
package foundry

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/x448/float16"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// DType is the storage type of weight matrices.
type DType string

const (
	F32  DType = "f32"
	F16  DType = "f16"
	Q8_0 DType = "q8_0"
)

// ParseDType checks a dtype name.
func ParseDType(s string) (DType, error) {
	switch DType(s) {
	case F32, F16, Q8_0:
		return DType(s), nil
	}
	return "", fmt.Errorf("unknown dtype %q (f32, f16, q8_0)", s)
}

func (d DType) kind() uint32 {
	switch d {
	case F16:
		return uint32(fsggml.TensorTypeF16)
	case Q8_0:
		return uint32(fsggml.TensorTypeQ8_0)
	}
	return uint32(fsggml.TensorTypeF32)
}

// fileType is general.file_type for the dtype (llama_ftype).
func (d DType) fileType() uint32 {
	switch d {
	case F16:
		return uint32(fsggml.FileTypeF16)
	case Q8_0:
		return uint32(fsggml.FileTypeQ8_0)
	}
	return uint32(fsggml.FileTypeF32)
}

// Matrix is a weight in ggml order: Shape[0] is the input dimension (the
// contiguous one), Shape[1] the output dimension. Element (out, in) is at
// Data[out*In + in], like a row-major [out][in] array.
type Matrix struct {
	In, Out int
	Data    []float32
}

// NewMatrix returns a zero matrix.
func NewMatrix(in, out int) *Matrix {
	return &Matrix{In: in, Out: out, Data: make([]float32, in*out)}
}

// Set stores w at (out, in).
func (m *Matrix) Set(out, in int, w float64) { m.Data[out*m.In+in] = float32(w) }

// At returns the value at (out, in).
func (m *Matrix) At(out, in int) float32 { return m.Data[out*m.In+in] }

// tensor is one tensor to write; gen fills its float32 data (ggml order)
// lazily so that large random models never sit in memory whole.
type tensor struct {
	name  string
	shape []uint64
	dtype DType
	gen   func(dst []float32)
}

func (t *tensor) elements() int {
	n := 1
	for _, d := range t.shape {
		n *= int(d)
	}
	return n
}

// WriteTo generates and encodes the tensor.
func (t *tensor) WriteTo(w io.Writer) (int64, error) {
	data := make([]float32, t.elements())
	t.gen(data)
	b := encode(data, t.dtype)
	n, err := w.Write(b)
	return int64(n), err
}

func fromMatrix(name string, m *Matrix, dtype DType) *tensor {
	return &tensor{name: name, shape: []uint64{uint64(m.In), uint64(m.Out)}, dtype: dtype,
		gen: func(dst []float32) { copy(dst, m.Data) }}
}

func fromVector(name string, v []float32) *tensor {
	return &tensor{name: name, shape: []uint64{uint64(len(v))}, dtype: F32,
		gen: func(dst []float32) { copy(dst, v) }}
}

// encode converts float32 data to the dtype's bytes.
func encode(data []float32, dtype DType) []byte {
	switch dtype {
	case F16:
		b := make([]byte, 2*len(data))
		for i, x := range data {
			binary.LittleEndian.PutUint16(b[2*i:], float16.Fromfloat32(x).Bits())
		}
		return b
	case Q8_0:
		return quantizeQ8_0(data)
	}
	b := make([]byte, 4*len(data))
	for i, x := range data {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// quantizeQ8_0 follows ggml's quantize_row_q8_0_ref: blocks of 32 values
// stored as an f16 scale d = max|x|/127 and 32 int8 round(x/d).
func quantizeQ8_0(data []float32) []byte {
	const qk = 32
	out := make([]byte, 0, len(data)/qk*(2+qk))
	for b := 0; b < len(data); b += qk {
		blk := data[b : b+qk]
		var amax float32
		for _, x := range blk {
			amax = max(amax, float32(math.Abs(float64(x))))
		}
		d := amax / 127
		var id float32
		if d != 0 {
			id = 1 / d
		}
		out = binary.LittleEndian.AppendUint16(out, float16.Fromfloat32(d).Bits())
		for _, x := range blk {
			out = append(out, byte(int8(math.Round(float64(x*id)))))
		}
	}
	return out
}

// write stores the model atomically as GGUF v3 through ollama's writer.
func write(path string, kv fsggml.KV, ts []*tensor) error {
	kv[versionKey] = Version
	fts := make([]*fsggml.Tensor, len(ts))
	for i, t := range ts {
		if t.dtype == Q8_0 && (len(t.shape) < 2 || t.shape[0]%32 != 0) {
			t.dtype = F32 // vectors and odd rows stay f32, as llama.cpp's quantizer does
		}
		fts[i] = &fsggml.Tensor{Name: t.name, Kind: t.dtype.kind(), Shape: t.shape, WriterTo: t}
	}
	return atomicfile.Write(path, 0o644, func(f *os.File) error {
		return fsggml.WriteGGUF(f, kv, fts)
	})
}
