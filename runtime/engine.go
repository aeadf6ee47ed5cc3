// Package runtime loads GGUF models and runs kvrecall's own llama-family
// forward pass on llama.cpp's ggml through ollama's Go engine: tokenization,
// chunked prefill with progress, sampling and streamed generation with stop
// strings and cancellation.
//
// A Model holds the weights and is safe for concurrent use; each Session is
// one sequence with its own KV cache and is used by one goroutine at a time.
package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/kvrecall/kvrecall/squeezed"
	"github.com/kvrecall/kvrecall/store"
	"io"
	"os"
	"path/filepath"
	goruntime "runtime"
	"sync"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend/ggml" // registers the ggml backend
	"github.com/ollama/ollama/model"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// Options configure Open. Zero values pick the documented defaults.
type Options struct {
	// Threads for ggml's CPU backend. 0 means one per CPU. (ggml itself has
	// no "auto": the value goes straight to its thread pool.)
	Threads int
	// ContextLength is the most tokens a session holds. 0 means the model's
	// trained context, capped at DefaultContextLength.
	ContextLength int
	// KVType is the element type of cached keys and values: "f16" (default) or "f32".
	KVType string
	// BatchSize is the number of tokens per forward pass during prefill (default 512).
	BatchSize int
	// FlashAttention uses ggml's fused attention kernel (slower on CPU).
	FlashAttention bool
	// NewCache builds the KV cache of each session; nil means a dense cache.
	NewCache CacheFactory
	// LoadProgress, if set, is called with the fraction of weights loaded.
	LoadProgress func(float32)
	// CacheDir is where GGUF v1 files are upgraded to v3 before loading;
	// default is the user cache directory.
	CacheDir string
	// PageSize is the tokens per page of paged caches and documents (16..256, default 64).
	PageSize int
	// DataDir holds ingested documents (default: kvrecall/documents/<model
	// fingerprint> under the user cache directory). One process owns it at a
	// time (an advisory lock): the owner sweeps what crashes left behind.
	DataDir string
	// MaxDocumentBytes bounds the host memory of opened documents' pages
	// (and of the cluster-ordered copies of their KV that squeezed
	// sessions build on the CPU: one more copy of the clustered tokens'
	// keys and values, counted when a session closes).
	// Beyond it the least recently used documents that no session is using
	// are dropped from memory; they stay on disk and reload on next use.
	// 0 means DefaultMaxDocumentBytes (4 GiB); negative means no bound.
	MaxDocumentBytes int64
	// Squeezed, if set, makes Ingest cluster each document's keys for the
	// "squeezed" method (Squeezed Attention) and calibrate its threshold
	// from the queries of the document's last tokens.
	Squeezed *squeezed.Options
	// Device is where the model's layers run: "" or "cpu" for the CPU
	// backend (the default, and what every paged cache is tuned for), "gpu"
	// for ggml's first GPU, or a device name as `kvrecall devices` lists
	// them ("CUDA0"). GPUs come from backend libraries loaded at start
	// (make cuda; docs/gpu.md); naming one that is not there is an error.
	Device string
	// GPULayers is how many layers go to a GPU Device, counted as
	// llama.cpp's -ngl counts them: the last GPULayers repeating layers,
	// and the output layer once GPULayers exceeds them. 0 means all of
	// them. Ignored when Device is the CPU.
	GPULayers int
	// Store, if set, is the shared document tier (Redis; see package store
	// and docs/store.md): documents are fetched from it instead of
	// prefilled when another process ingested them, and stored in it after
	// an ingest. DataDir stays the local tier in front of it. The caller
	// owns the store and closes it after the model.
	Store *store.Store
}

// DefaultContextLength caps the default context so that dense caches of
// large models fit in memory; set Options.ContextLength for more.
const DefaultContextLength = 8192

// CacheFactory builds the KV cache of one session. The returned cache has
// been Init-ed for one sequence.
type CacheFactory func(m *Model) (ollamakv.Cache, error)

// Model is a loaded GGUF model.
type Model struct {
	path    string
	file    *gguf.File
	cfg     arch.Config
	net     *arch.Model
	backend ml.Backend
	tok     *Tokenizer
	opts    Options
	kvType  ml.DType
	fp      kvcache.Fingerprint
	device  DeviceUse // where the layers run (device.go)

	docs   docStore    // documents in host memory (documents.go)
	shared sharedState // the shared store's bookkeeping (shared.go)

	heads headDefault // the head profile "+heads" methods use by default

	// life guards the backend against Close: every forward pass (and the
	// cache allocation of NewSession) holds it for reading, Close for
	// writing. Close therefore
	// waits for the passes in flight (each is bounded by BatchSize tokens)
	// and later ones are refused with ErrClosed instead of running on freed
	// memory.
	life   sync.RWMutex
	closed bool

	// The longest ingest graph the compute buffer was reserved for
	// (reserve.go): cells of keys and batch tokens.
	reserveMu                    sync.Mutex
	reservedCells, reservedBatch int
	// The largest dense prefill graph it was reserved for (reserveDense).
	denseReserved denseReserve
}

// ErrClosed is returned by work started on a model after Close.
var ErrClosed = errors.New("model is closed")

// MaxBatchSize bounds Options.BatchSize: cancellation is checked between
// batches, so a batch is the longest stretch a cancelled request keeps
// computing (and Close waits).
const MaxBatchSize = 4096

// OpenError names the file and what is wrong with it.
type OpenError struct {
	Path string
	Err  error
}

func (e *OpenError) Error() string { return fmt.Sprintf("open model %s: %v", e.Path, e.Err) }
func (e *OpenError) Unwrap() error { return e.Err }

// Open checks and loads the GGUF model at path. Any problem with the file
// (truncated, not GGUF, unsupported architecture, missing tensor, wrong
// shape) is returned as an *OpenError naming the file; it never panics.
func Open(ctx context.Context, path string, opts Options) (m *Model, err error) {
	fail := func(err error) (*Model, error) { return nil, &OpenError{Path: path, Err: err} }
	f, err := gguf.Open(path)
	if err != nil {
		var ge *gguf.Error
		if errors.As(err, &ge) {
			return fail(errors.New(ge.Problem))
		}
		return fail(err)
	}
	cfg, err := arch.ParseConfig(f)
	if err != nil {
		return fail(err)
	}
	loadPath := path
	if f.Version < 2 {
		// ollama's reader cannot parse v1; run on a v3 copy made once.
		if loadPath, err = upgradedCopy(path, opts.CacheDir); err != nil {
			return fail(err)
		}
	}
	if opts.Threads <= 0 {
		opts.Threads = goruntime.NumCPU()
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 512
	}
	if opts.BatchSize > MaxBatchSize {
		return fail(fmt.Errorf("batch size %d exceeds %d: cancellation is only checked between batches", opts.BatchSize, MaxBatchSize))
	}
	if opts.ContextLength <= 0 {
		opts.ContextLength = DefaultContextLength
		if cfg.ContextLength > 0 {
			opts.ContextLength = min(cfg.ContextLength, DefaultContextLength)
		}
	}
	kv := ml.DTypeF16
	switch opts.KVType {
	case "", "f16":
		opts.KVType = "f16"
	case "f32":
		kv = ml.DTypeF32
	default:
		return fail(fmt.Errorf("KV type %q is not supported (f16, f32)", opts.KVType))
	}
	if opts.NewCache == nil {
		opts.NewCache = DenseCache
	}
	if opts.PageSize == 0 {
		opts.PageSize = DefaultPageSize
	}
	if opts.MaxDocumentBytes == 0 {
		opts.MaxDocumentBytes = DefaultMaxDocumentBytes
	}
	if opts.Squeezed != nil {
		so, err := opts.Squeezed.Fill()
		if err != nil {
			return fail(err)
		}
		opts.Squeezed = &so
	}
	if opts.PageSize < 16 || opts.PageSize > 256 {
		return fail(fmt.Errorf("page size %d is outside 16..256", opts.PageSize))
	}
	fp, err := fingerprint(path, f)
	if err != nil {
		return fail(err)
	}
	if opts.DataDir == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			d = os.TempDir()
		}
		opts.DataDir = filepath.Join(d, "kvrecall", "documents", hex.EncodeToString(fp[:8]))
	}

	// ollama's loader panics on some failures (allocation); turn that into an error.
	defer func() {
		if r := recover(); r != nil {
			m, err = nil, &OpenError{Path: path, Err: fmt.Errorf("engine: %v", r)}
		}
	}()
	fa := ml.FlashAttentionDisabled
	if opts.FlashAttention {
		fa = ml.FlashAttentionEnabled
	}
	dev, gpuLayers, err := placeLayers(opts.Device, opts.GPULayers, cfg.Layers)
	if err != nil {
		return fail(err)
	}
	mm, err := model.New(loadPath, ml.BackendParams{AllocMemory: true, NumThreads: opts.Threads, FlashAttention: fa, GPULayers: gpuLayers})
	if err != nil {
		return fail(err)
	}
	net, ok := mm.(*arch.Model)
	if !ok {
		mm.Backend().Close()
		return fail(fmt.Errorf("architecture %q is registered by another package", cfg.Arch))
	}
	if err := checkOffload(mm.Backend().BackendMemory(), dev.Device, gpuLayers); err != nil {
		mm.Backend().Close()
		return fail(err)
	}
	if err := mm.Backend().Load(ctx, opts.LoadProgress); err != nil {
		mm.Backend().Close()
		return fail(fmt.Errorf("load weights: %w", err))
	}
	tok, err := newTokenizer(mm.Backend().Config())
	if err != nil {
		mm.Backend().Close()
		return fail(err)
	}
	net.Params.Vocab = cfg.Vocab
	net.Params.TiedOutput = cfg.TiedOutput
	net.Params.RopeFreqs = cfg.RopeFreqs
	net.Params.LongRoPE, net.Params.RopeOrigContext = cfg.LongRoPE, cfg.RopeOrigContext
	// llama.cpp picks LongRoPE's factors by the context of a sequence.
	net.Params.LongFactors = cfg.LongRoPE && opts.ContextLength > cfg.RopeOrigContext
	cfg.LongFactors = net.Params.LongFactors
	return &Model{path: path, file: f, cfg: cfg, net: net, backend: mm.Backend(), tok: tok, opts: opts, kvType: kv,
		fp: fp, device: dev}, nil
}

// fingerprint identifies a model file for its documents: the GGUF header, the
// file size and samples of the tensor data.
func fingerprint(path string, f *gguf.File) (kvcache.Fingerprint, error) {
	var fp kvcache.Fingerprint
	r, err := os.Open(path)
	if err != nil {
		return fp, err
	}
	defer r.Close()
	h := sha256.New()
	fmt.Fprintf(h, "%d\n", f.Size)
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, f.DataOffset)); err != nil {
		return fp, err
	}
	data := f.Size - f.DataOffset
	const sample = 1 << 20
	for _, at := range []int64{0, data / 2, data - sample} {
		at = max(0, min(at, data-sample))
		if _, err := io.Copy(h, io.NewSectionReader(r, f.DataOffset+at, min(sample, data))); err != nil {
			return fp, err
		}
	}
	copy(fp[:], h.Sum(nil))
	return fp, nil
}

// Close frees the weights. It waits for forward passes in flight to end
// (cancel their contexts first so that they stop at the next batch or
// token); passes started afterwards fail with ErrClosed. Sessions should be
// closed first; one used after Close gets ErrClosed, never freed memory.
// Closing twice is harmless.
func (m *Model) Close() {
	if m == nil {
		return
	}
	m.closeDocuments()
	m.life.Lock()
	defer m.life.Unlock()
	if m.closed || m.backend == nil {
		return
	}
	m.closed = true
	m.backend.Close()
}

// use holds the backend open for one forward pass or cache allocation; the
// returned function releases it.
func (m *Model) use() (func(), error) {
	m.life.RLock()
	if m.closed {
		m.life.RUnlock()
		return nil, ErrClosed
	}
	return m.life.RUnlock, nil
}

// Path is the file the model was opened from.
func (m *Model) Path() string { return m.path }

// Config returns the model's hyperparameters.
func (m *Model) Config() arch.Config { return m.cfg }

// Options returns the options in effect (defaults filled in).
func (m *Model) Options() Options { return m.opts }

// Tokenizer returns the model's tokenizer.
func (m *Model) Tokenizer() *Tokenizer { return m.tok }

// Backend returns ollama's ml backend holding the weights.
func (m *Model) Backend() ml.Backend { return m.backend }

// Arch returns the forward pass.
func (m *Model) Arch() *arch.Model { return m.net }

// KVType returns the element type of cached keys and values.
func (m *Model) KVType() ml.DType { return m.kvType }

// Fingerprint identifies the model file (documents record it).
func (m *Model) Fingerprint() kvcache.Fingerprint { return m.fp }

// File returns the parsed GGUF header.
func (m *Model) File() *gguf.File { return m.file }

// DenseCache is the default cache: ollama's causal cache over the whole
// context, every key visible to every query. A model with sliding-window
// layers (gemma2, gemma3) gets ollama's wrapper of two caches: windowed
// layers (type 0) in an SWA cache that keeps only the window (plus a
// batch), global layers (type 1) in a causal one. ollama's SWA window W
// shows keys p0 >= p1-W, llama.cpp's n_swa those with p1-p0 < n_swa: W is
// n_swa-1.
//
// Models without sliding windows get denseCache (densecache.go): the same
// cells, keys, values and mask as ollama's causal cache, without the
// per-step scan and host mask that made a step's fixed cost grow with the
// context.
func DenseCache(m *Model) (ollamakv.Cache, error) {
	var c ollamakv.Cache
	if w := m.cfg.SlidingWindow; w > 0 {
		c = ollamakv.NewWrapperCache(ollamakv.NewSWACache(int32(w-1), m.net.Shift), ollamakv.NewCausalCache(m.net.Shift))
	} else {
		c = newDenseCache()
	}
	c.Init(m.backend, m.kvType, 1, m.opts.ContextLength, m.opts.BatchSize)
	return c, nil
}

// upgradedCopy returns a GGUF v3 copy of a v1 file, made once per content.
func upgradedCopy(path, dir string) (string, error) {
	if dir == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			d = os.TempDir()
		}
		dir = filepath.Join(d, "kvrecall", "upgraded")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	f.Close()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, hex.EncodeToString(h.Sum(nil))[:16]+".gguf")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := gguf.Upgrade(path, out); err != nil {
		return "", fmt.Errorf("upgrade GGUF v1 to v3: %w", err)
	}
	return out, nil
}
