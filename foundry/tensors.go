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
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/ollama/ollama/ml/backend/ggml"
	"github.com/x448/float16"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// DType is the storage type of weight matrices.
type DType string

const (
	F32  DType = "f32"
	F16  DType = "f16"
	Q8_0 DType = "q8_0"
	Q4_0 DType = "q4_0"
	Q4_K DType = "q4_k"
	Q5_K DType = "q5_k"
	Q6_K DType = "q6_k"
	// Q4_K_M is llama.cpp's mix of that name: Q4_K, with Q6_K for the
	// output matrix and for attn_v and ffn_down in the layers its recipe
	// gives more bits (see mixType).
	Q4_K_M DType = "q4_k_m"
)

// DTypes lists the weight types the foundry writes.
var DTypes = []DType{F32, F16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, Q4_K_M}

// ParseDType checks a dtype name.
func ParseDType(s string) (DType, error) {
	for _, d := range DTypes {
		if DType(s) == d {
			return d, nil
		}
	}
	return "", fmt.Errorf("unknown dtype %q (%s)", s, dtypeList())
}

func dtypeList() string {
	var names []string
	for _, d := range DTypes {
		names = append(names, string(d))
	}
	return strings.Join(names, ", ")
}

// tensorType is the ggml tensor type of a dtype (Q4_K_M is resolved per
// tensor before this).
func (d DType) tensorType() fsggml.TensorType {
	switch d {
	case F16:
		return fsggml.TensorTypeF16
	case Q8_0:
		return fsggml.TensorTypeQ8_0
	case Q4_0:
		return fsggml.TensorTypeQ4_0
	case Q4_K, Q4_K_M:
		return fsggml.TensorTypeQ4_K
	case Q5_K:
		return fsggml.TensorTypeQ5_K
	case Q6_K:
		return fsggml.TensorTypeQ6_K
	}
	return fsggml.TensorTypeF32
}

func (d DType) kind() uint32 { return uint32(d.tensorType()) }

// blockSize is the row length a quantized type's blocks divide (1 for
// float types).
func (d DType) blockSize() int {
	switch d {
	case Q8_0, Q4_0:
		return 32
	case Q4_K, Q5_K, Q6_K, Q4_K_M:
		return 256
	}
	return 1
}

// fileType is general.file_type for the dtype (llama_ftype).
func (d DType) fileType() uint32 {
	switch d {
	case F16:
		return uint32(fsggml.FileTypeF16)
	case Q8_0:
		return uint32(fsggml.FileTypeQ8_0)
	case Q4_0:
		return 2 // LLAMA_FTYPE_MOSTLY_Q4_0
	case Q4_K:
		return uint32(fsggml.FileTypeQ4_K_S)
	case Q4_K_M:
		return uint32(fsggml.FileTypeQ4_K_M)
	case Q5_K:
		return 17 // LLAMA_FTYPE_MOSTLY_Q5_K_M
	case Q6_K:
		return 18 // LLAMA_FTYPE_MOSTLY_Q6_K
	}
	return uint32(fsggml.FileTypeF32)
}

// mixType resolves Q4_K_M for one tensor as llama.cpp's recipe does:
// output.weight Q6_K; attn_v and ffn_down Q6_K in the first and last
// eighth of the layers and every third layer between (use_more_bits),
// Q4_K elsewhere.
func mixType(name string, layers int) DType {
	if name == "output.weight" {
		return Q6_K
	}
	var l int
	var rest string
	if _, err := fmt.Sscanf(name, "blk.%d.%s", &l, &rest); err != nil {
		return Q4_K
	}
	if !strings.HasPrefix(rest, "attn_v.") && !strings.HasPrefix(rest, "ffn_down.") {
		return Q4_K
	}
	if l < layers/8 || l >= 7*layers/8 || (l-layers/8)%3 == 2 {
		return Q6_K
	}
	return Q4_K
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
	b := encode(data, t.shape, t.dtype)
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

// encode converts float32 data of a tensor's shape to the dtype's bytes.
// Quantized types go through ggml's own quantizer (ggml_quantize_chunk via
// the pinned module), so the blocks are the ones llama.cpp would write.
func encode(data []float32, shape []uint64, dtype DType) []byte {
	switch dtype {
	case F32:
		b := make([]byte, 4*len(data))
		for i, x := range data {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
		}
		return b
	case F16:
		b := make([]byte, 2*len(data))
		for i, x := range data {
			binary.LittleEndian.PutUint16(b[2*i:], float16.Fromfloat32(x).Bits())
		}
		return b
	}
	return ggml.Quantize(dtype.tensorType(), data, shape)
}

// write stores the model atomically as GGUF v3 through ollama's writer.
func write(path string, kv fsggml.KV, ts []*tensor) error {
	kv[versionKey] = Version
	layers := 0
	for _, t := range ts {
		var l int
		if _, err := fmt.Sscanf(t.name, "blk.%d.", &l); err == nil {
			layers = max(layers, l+1)
		}
	}
	fts := make([]*fsggml.Tensor, len(ts))
	for i, t := range ts {
		if t.dtype == Q4_K_M {
			t.dtype = mixType(t.name, layers)
		}
		if b := t.dtype.blockSize(); b > 1 && (len(t.shape) < 2 || int(t.shape[0])%b != 0) {
			// Vectors stay f32; rows the type's blocks do not divide fall
			// back as llama.cpp's quantizer falls back (to Q8_0 here).
			t.dtype = F32
			if len(t.shape) >= 2 && t.shape[0]%32 == 0 {
				t.dtype = Q8_0
			}
		}
		fts[i] = &fsggml.Tensor{Name: t.name, Kind: t.dtype.kind(), Shape: t.shape, WriterTo: t}
	}
	return atomicfile.Write(path, 0o644, func(f *os.File) error {
		return fsggml.WriteGGUF(f, kv, fts)
	})
}
