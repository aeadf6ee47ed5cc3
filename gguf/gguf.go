// Package gguf reads and checks GGUF model headers (versions 1 to 3) without
// trusting them: every count, length and offset is bounded by the bytes that
// are really there, so a corrupt or hostile file gives an error, never a panic
// or a huge allocation.
//
// The engine itself loads weights through ollama's fs/ggml; this package is
// the gate in front of it (clear errors naming the file and the problem) and
// the reader for GGUF v1 files, which ollama's reader cannot parse.
package gguf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"

	fsggml "github.com/ollama/ollama/fs/ggml"
)

// Value types as stored in the file.
const (
	TypeUint8   uint32 = 0
	TypeInt8    uint32 = 1
	TypeUint16  uint32 = 2
	TypeInt16   uint32 = 3
	TypeUint32  uint32 = 4
	TypeInt32   uint32 = 5
	TypeFloat32 uint32 = 6
	TypeBool    uint32 = 7
	TypeString  uint32 = 8
	TypeArray   uint32 = 9
	TypeUint64  uint32 = 10
	TypeInt64   uint32 = 11
	TypeFloat64 uint32 = 12
)

const (
	magic            = "GGUF"
	maxDims          = 4       // GGML_MAX_DIMS
	maxStringLen     = 1 << 24 // 16 MiB: chat templates are long, nothing sane is longer
	defaultAlignment = 32
)

// ErrFormat is wrapped by every error about the file's content.
var ErrFormat = errors.New("invalid GGUF")

// KV is one metadata pair. Value holds a Go value of the stored type:
// uint8..float64, bool, string, or a slice of one of those ([]string, []int32...).
type KV struct {
	Key   string
	Type  uint32 // TypeArray for arrays
	Elem  uint32 // element type for arrays
	Value any
}

// Tensor describes one tensor in the file. Shape is in ggml order
// (fastest-varying dimension first).
type Tensor struct {
	Name   string
	Shape  []uint64
	Kind   uint32 // ggml_type
	Offset uint64 // relative to the data section
}

// Elements returns the number of elements.
func (t Tensor) Elements() uint64 {
	n := uint64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Bytes returns the stored size in bytes (0 for an unknown type).
func (t Tensor) Bytes() uint64 {
	tt := fsggml.TensorType(t.Kind)
	if tt.TypeSize() == 0 || tt.BlockSize() == 0 {
		return 0
	}
	return t.Elements() / tt.BlockSize() * tt.TypeSize()
}

// File is a parsed header.
type File struct {
	Path       string
	Version    uint32
	KVs        []KV
	Tensors    []Tensor
	Alignment  uint64
	DataOffset int64 // absolute offset of the tensor data section
	Size       int64 // file size

	index map[string]int
}

// Error names the file and the problem.
type Error struct {
	Path    string
	Problem string
	Err     error
}

func (e *Error) Error() string {
	p := e.Path
	if p == "" {
		p = "<input>"
	}
	return fmt.Sprintf("%s: %s", p, e.Problem)
}

func (e *Error) Unwrap() error { return e.Err }

func formatErr(path, format string, args ...any) error {
	return &Error{Path: path, Problem: fmt.Sprintf(format, args...), Err: ErrFormat}
}

// Open reads and checks the header of the GGUF file at path.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, &Error{Path: path, Problem: err.Error(), Err: err}
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, &Error{Path: path, Problem: err.Error(), Err: err}
	}
	if st.IsDir() {
		return nil, &Error{Path: path, Problem: "is a directory, not a GGUF file", Err: ErrFormat}
	}
	return Read(f, st.Size(), path)
}

// Read parses a header from r, whose total size is size. path is only used in errors.
func Read(r io.ReaderAt, size int64, path string) (*File, error) {
	d := &decoder{r: r, size: size, path: path}
	gf, err := d.file()
	if err != nil {
		return nil, err
	}
	return gf, nil
}

// Get returns the value stored under key and whether it exists.
func (f *File) Get(key string) (any, bool) {
	i, ok := f.index[key]
	if !ok {
		return nil, false
	}
	return f.KVs[i].Value, true
}

// String returns a string value or "".
func (f *File) String(key string) string {
	v, _ := f.Get(key)
	s, _ := v.(string)
	return s
}

// Uint returns an unsigned integer value of any width, and whether it was present as one.
func (f *File) Uint(key string) (uint64, bool) {
	v, ok := f.Get(key)
	if !ok {
		return 0, false
	}
	return AsUint(v)
}

// AsUint converts a metadata value of any integer type to uint64; negative
// and non-integer values report false.
func AsUint(v any) (uint64, bool) {
	switch x := v.(type) {
	case uint8:
		return uint64(x), true
	case uint16:
		return uint64(x), true
	case uint32:
		return uint64(x), true
	case uint64:
		return x, true
	case int8:
		return uint64(x), x >= 0
	case int16:
		return uint64(x), x >= 0
	case int32:
		return uint64(x), x >= 0
	case int64:
		return uint64(x), x >= 0
	}
	return 0, false
}

// Architecture returns general.architecture.
func (f *File) Architecture() string { return f.String("general.architecture") }

// Tensor returns the tensor called name.
func (f *File) Tensor(name string) (Tensor, bool) {
	for _, t := range f.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return Tensor{}, false
}

type decoder struct {
	r    io.ReaderAt
	size int64
	off  int64
	path string
	v    uint32
	buf  [8]byte
}

func (d *decoder) fail(format string, args ...any) error {
	return formatErr(d.path, format+" (at byte %d)", append(args, d.off)...)
}

func (d *decoder) read(n int) ([]byte, error) {
	if int64(n) > d.size-d.off {
		return nil, d.fail("truncated: needs %d more bytes, file has %d", n, d.size-d.off)
	}
	var b []byte
	if n <= len(d.buf) {
		b = d.buf[:n]
	} else {
		b = make([]byte, n)
	}
	if _, err := d.r.ReadAt(b, d.off); err != nil {
		return nil, &Error{Path: d.path, Problem: fmt.Sprintf("read at byte %d: %v", d.off, err), Err: err}
	}
	d.off += int64(n)
	return b, nil
}

func (d *decoder) u32() (uint32, error) {
	b, err := d.read(4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

func (d *decoder) u64() (uint64, error) {
	b, err := d.read(8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// count reads a length or count: 32 bits in v1, 64 bits after.
func (d *decoder) count() (uint64, error) {
	if d.v == 1 {
		n, err := d.u32()
		return uint64(n), err
	}
	return d.u64()
}

func (d *decoder) str() (string, error) {
	n, err := d.count()
	if err != nil {
		return "", err
	}
	if n > maxStringLen {
		return "", d.fail("string of %d bytes exceeds the %d byte limit", n, maxStringLen)
	}
	b, err := d.read(int(n))
	if err != nil {
		return "", err
	}
	return string(b), nil
}

func (d *decoder) file() (*File, error) {
	if d.size < 4 {
		return nil, formatErr(d.path, "too short to be a GGUF file (%d bytes)", d.size)
	}
	m, err := d.read(4)
	if err != nil {
		return nil, err
	}
	if string(m) != magic {
		return nil, formatErr(d.path, "wrong magic %q: not a GGUF file", string(m))
	}
	if d.v, err = d.u32(); err != nil {
		return nil, err
	}
	if d.v < 1 || d.v > 3 {
		return nil, formatErr(d.path, "unsupported GGUF version %d (supported: 1, 2, 3)", d.v)
	}
	nt, err := d.count()
	if err != nil {
		return nil, err
	}
	nkv, err := d.count()
	if err != nil {
		return nil, err
	}
	// Every KV pair takes at least 12 bytes and every tensor info at least 16,
	// so counts beyond what the file can hold are lies.
	rest := uint64(d.size - d.off)
	if nkv > rest/12 {
		return nil, d.fail("claims %d metadata pairs, more than the file can hold", nkv)
	}
	if nt > rest/16 {
		return nil, d.fail("claims %d tensors, more than the file can hold", nt)
	}
	gf := &File{Path: d.path, Version: d.v, Size: d.size, Alignment: defaultAlignment, index: make(map[string]int, nkv)}
	gf.KVs = make([]KV, 0, nkv)
	for i := uint64(0); i < nkv; i++ {
		kv, err := d.kv()
		if err != nil {
			return nil, err
		}
		if _, dup := gf.index[kv.Key]; dup {
			return nil, d.fail("duplicate metadata key %q", kv.Key)
		}
		gf.index[kv.Key] = len(gf.KVs)
		gf.KVs = append(gf.KVs, kv)
	}
	if a, ok := gf.Uint("general.alignment"); ok {
		if a == 0 || a&(a-1) != 0 || a > 1<<20 {
			return nil, formatErr(d.path, "general.alignment %d is not a power of two up to 1 MiB", a)
		}
		gf.Alignment = a
	}
	gf.Tensors = make([]Tensor, 0, nt)
	names := make(map[string]bool, nt)
	for i := uint64(0); i < nt; i++ {
		t, err := d.tensor()
		if err != nil {
			return nil, err
		}
		if names[t.Name] {
			return nil, d.fail("duplicate tensor %q", t.Name)
		}
		names[t.Name] = true
		gf.Tensors = append(gf.Tensors, t)
	}
	gf.DataOffset = d.off + int64(pad(uint64(d.off), gf.Alignment))
	if err := gf.checkData(); err != nil {
		return nil, err
	}
	return gf, nil
}

func pad(off, align uint64) uint64 { return (align - off%align) % align }

func (d *decoder) kv() (KV, error) {
	key, err := d.str()
	if err != nil {
		return KV{}, err
	}
	if key == "" {
		return KV{}, d.fail("empty metadata key")
	}
	t, err := d.u32()
	if err != nil {
		return KV{}, err
	}
	kv := KV{Key: key, Type: t}
	if t == TypeArray {
		et, err := d.u32()
		if err != nil {
			return KV{}, err
		}
		n, err := d.count()
		if err != nil {
			return KV{}, err
		}
		kv.Elem = et
		kv.Value, err = d.array(key, et, n)
		return kv, err
	}
	kv.Value, err = d.scalar(key, t)
	return kv, err
}

func scalarSize(t uint32) int {
	switch t {
	case TypeUint8, TypeInt8, TypeBool:
		return 1
	case TypeUint16, TypeInt16:
		return 2
	case TypeUint32, TypeInt32, TypeFloat32:
		return 4
	case TypeUint64, TypeInt64, TypeFloat64:
		return 8
	}
	return 0
}

func (d *decoder) scalar(key string, t uint32) (any, error) {
	if t == TypeString {
		return d.str()
	}
	n := scalarSize(t)
	if n == 0 {
		return nil, d.fail("metadata %q has unknown value type %d", key, t)
	}
	b, err := d.read(n)
	if err != nil {
		return nil, err
	}
	return decodeScalar(t, b), nil
}

func decodeScalar(t uint32, b []byte) any {
	le := binary.LittleEndian
	switch t {
	case TypeUint8:
		return b[0]
	case TypeInt8:
		return int8(b[0])
	case TypeBool:
		return b[0] != 0
	case TypeUint16:
		return le.Uint16(b)
	case TypeInt16:
		return int16(le.Uint16(b))
	case TypeUint32:
		return le.Uint32(b)
	case TypeInt32:
		return int32(le.Uint32(b))
	case TypeFloat32:
		return math.Float32frombits(le.Uint32(b))
	case TypeUint64:
		return le.Uint64(b)
	case TypeInt64:
		return int64(le.Uint64(b))
	case TypeFloat64:
		return math.Float64frombits(le.Uint64(b))
	}
	return nil
}

func (d *decoder) array(key string, et uint32, n uint64) (any, error) {
	rest := uint64(d.size - d.off)
	switch et {
	case TypeString:
		// each string takes at least its length field
		min := uint64(8)
		if d.v == 1 {
			min = 4
		}
		if n > rest/min {
			return nil, d.fail("array %q claims %d strings, more than the file can hold", key, n)
		}
		out := make([]string, n)
		for i := range out {
			s, err := d.str()
			if err != nil {
				return nil, err
			}
			out[i] = s
		}
		return out, nil
	case TypeArray:
		return nil, d.fail("array %q of arrays is not supported", key)
	}
	sz := scalarSize(et)
	if sz == 0 {
		return nil, d.fail("array %q has unknown element type %d", key, et)
	}
	if n > rest/uint64(sz) {
		return nil, d.fail("array %q claims %d elements, more than the file can hold", key, n)
	}
	b, err := d.read(int(n) * sz)
	if err != nil {
		return nil, err
	}
	return decodeArray(et, b, int(n)), nil
}

func decodeArray(et uint32, b []byte, n int) any {
	sz := scalarSize(et)
	switch et {
	case TypeUint8:
		return append([]uint8(nil), b...)
	case TypeInt8:
		out := make([]int8, n)
		for i := range out {
			out[i] = int8(b[i])
		}
		return out
	case TypeBool:
		out := make([]bool, n)
		for i := range out {
			out[i] = b[i] != 0
		}
		return out
	case TypeUint16:
		return decodeSlice[uint16](et, b, n, sz)
	case TypeInt16:
		return decodeSlice[int16](et, b, n, sz)
	case TypeUint32:
		return decodeSlice[uint32](et, b, n, sz)
	case TypeInt32:
		return decodeSlice[int32](et, b, n, sz)
	case TypeFloat32:
		return decodeSlice[float32](et, b, n, sz)
	case TypeUint64:
		return decodeSlice[uint64](et, b, n, sz)
	case TypeInt64:
		return decodeSlice[int64](et, b, n, sz)
	case TypeFloat64:
		return decodeSlice[float64](et, b, n, sz)
	}
	return nil
}

func decodeSlice[T any](et uint32, b []byte, n, sz int) []T {
	out := make([]T, n)
	for i := range out {
		out[i] = decodeScalar(et, b[i*sz:(i+1)*sz]).(T)
	}
	return out
}

func (d *decoder) tensor() (Tensor, error) {
	name, err := d.str()
	if err != nil {
		return Tensor{}, err
	}
	if name == "" {
		return Tensor{}, d.fail("tensor with an empty name")
	}
	nd, err := d.u32()
	if err != nil {
		return Tensor{}, err
	}
	if nd == 0 || nd > maxDims {
		return Tensor{}, d.fail("tensor %q has %d dimensions (1 to %d allowed)", name, nd, maxDims)
	}
	t := Tensor{Name: name, Shape: make([]uint64, nd)}
	elems := uint64(1)
	for i := range t.Shape {
		var dim uint64
		if d.v == 1 {
			v, err := d.u32()
			if err != nil {
				return Tensor{}, err
			}
			dim = uint64(v)
		} else if dim, err = d.u64(); err != nil {
			return Tensor{}, err
		}
		if dim == 0 {
			return Tensor{}, d.fail("tensor %q has a zero dimension", name)
		}
		if elems > math.MaxInt64/dim {
			return Tensor{}, d.fail("tensor %q shape %v overflows", name, t.Shape[:i+1])
		}
		elems *= dim
		t.Shape[i] = dim
	}
	if t.Kind, err = d.u32(); err != nil {
		return Tensor{}, err
	}
	tt := fsggml.TensorType(t.Kind)
	if tt.TypeSize() == 0 {
		return Tensor{}, d.fail("tensor %q has unknown type %d", name, t.Kind)
	}
	if t.Shape[0]%tt.BlockSize() != 0 {
		return Tensor{}, d.fail("tensor %q: first dimension %d is not a multiple of its type's block size %d", name, t.Shape[0], tt.BlockSize())
	}
	if t.Offset, err = d.u64(); err != nil {
		return Tensor{}, err
	}
	return t, nil
}

// checkData verifies that every tensor's bytes lie inside the file.
func (f *File) checkData() error {
	if f.DataOffset > f.Size && len(f.Tensors) > 0 {
		return formatErr(f.Path, "truncated: tensor data would start at byte %d, file has %d", f.DataOffset, f.Size)
	}
	avail := uint64(0)
	if f.Size > f.DataOffset {
		avail = uint64(f.Size - f.DataOffset)
	}
	for _, t := range f.Tensors {
		n := t.Bytes()
		if t.Offset%f.Alignment != 0 {
			return formatErr(f.Path, "tensor %q offset %d is not aligned to %d", t.Name, t.Offset, f.Alignment)
		}
		if t.Offset > avail || n > avail-t.Offset {
			return formatErr(f.Path, "truncated: tensor %q needs bytes %d..%d of the data section, which has %d",
				t.Name, t.Offset, t.Offset+n, avail)
		}
	}
	return nil
}
