// Package llamaref runs llama.cpp's own dense, full-attention graph on a GGUF
// file: the reference our engine is checked and benchmarked against.
//
// It calls llama.cpp's C API directly (the symbols come from ollama's cgo
// package github.com/ollama/ollama/llama) because the Go wrapper there cannot
// select an f32 KV cache or turn embeddings off, and parity tests must compare
// like with like. Include paths for llama.h come from the Makefile.
//
// A Model holds one llama.cpp context and one sequence; it is not safe for
// concurrent use.
package llamaref

/*
#include <stdlib.h>
#include "llama.h"

static struct llama_context_params kvr_ctx_params(uint32_t n_ctx, uint32_t n_batch, int32_t threads,
		int32_t batch_threads, enum ggml_type kv, int flash, int swa_window) {
	struct llama_context_params p = llama_context_default_params();
	p.swa_full = !swa_window;
	p.n_ctx = n_ctx;
	p.n_batch = n_batch;
	p.n_ubatch = n_batch;
	p.n_seq_max = 1;
	p.n_threads = threads;
	p.n_threads_batch = batch_threads;
	p.type_k = kv;
	p.type_v = kv;
	p.embeddings = false;
	p.no_perf = true;
	p.flash_attn_type = flash ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
	return p;
}

// llama.cpp prints progress dots unless a callback is set.
static bool kvr_quiet_progress(float progress, void *user) { (void)progress; (void)user; return true; }

// devs is the NULL-terminated list of devices llama.cpp may offload to:
// llama.cpp's NULL would mean every GPU ggml has, even with no layer
// offloaded (it still sends large batches to them), so the CPU reference
// passes an empty list and a GPU run the one device it is compared on.
static struct llama_model_params kvr_model_params(int gpu_layers, ggml_backend_dev_t *devs) {
	struct llama_model_params p = llama_model_default_params();
	p.n_gpu_layers = gpu_layers;
	p.devices = devs;
	p.use_mmap = true;
	p.progress_callback = kvr_quiet_progress;
	return p;
}

static void kvr_batch_set(struct llama_batch *b, int i, llama_token tok, llama_pos pos, int logits) {
	b->token[i] = tok;
	b->pos[i] = pos;
	b->n_seq_id[i] = 1;
	b->seq_id[i][0] = 0;
	b->logits[i] = logits;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/ollama/ollama/llama"
)

// Options configure the llama.cpp context.
type Options struct {
	Threads        int    // CPU threads; 0 means 1
	BatchThreads   int    // threads for prompt batches; 0 means Threads
	Context        int    // KV capacity in tokens; 0 means 4096
	Batch          int    // tokens per llama_decode call; 0 means 512
	KVType         string // "f16" (default), "f32" or "q8_0"
	FlashAttention bool
	// SWAWindow keeps only the window (plus a batch) in the caches of
	// sliding-window layers (gemma): llama.cpp's swa_full = false, what
	// its CLI and server default to. The C API's default, kept when
	// false, gives those layers full-size caches of Context cells.
	SWAWindow bool
	// Device is the ggml device (a name from `kvrecall devices`, "CUDA0")
	// that GPULayers go to; "" keeps llama.cpp off every GPU, whatever
	// ggml has loaded (make cuda; docs/gpu.md).
	Device string
	// GPULayers is llama.cpp's n_gpu_layers (-ngl): layers offloaded to
	// Device, the last ones first. 0 keeps every layer on the CPU.
	GPULayers int
}

// Model is a loaded GGUF file with one llama.cpp context.
type Model struct {
	path   string
	model  *C.struct_llama_model
	ctx    *C.struct_llama_context
	vocab  *C.struct_llama_vocab
	nvocab int
	batch  C.struct_llama_batch
	nbatch int
	nctx   int
	n      int // tokens in the KV cache
}

var initOnce sync.Once

func kvType(s string) (C.enum_ggml_type, error) {
	switch s {
	case "", "f16":
		return C.GGML_TYPE_F16, nil
	case "f32":
		return C.GGML_TYPE_F32, nil
	case "q8_0":
		return C.GGML_TYPE_Q8_0, nil
	}
	return 0, fmt.Errorf("llamaref: unsupported KV type %q (f16, f32, q8_0)", s)
}

// Load opens path in llama.cpp.
func Load(path string, opts Options) (*Model, error) {
	initOnce.Do(func() {
		llama.BackendInit()
	})
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("llamaref: %w", err)
	}
	kv, err := kvType(opts.KVType)
	if err != nil {
		return nil, err
	}
	if opts.Threads <= 0 {
		opts.Threads = 1
	}
	if opts.BatchThreads <= 0 {
		opts.BatchThreads = opts.Threads
	}
	if opts.Context <= 0 {
		opts.Context = 4096
	}
	if opts.Batch <= 0 {
		opts.Batch = 512
	}
	// Two slots: the device (or none) and the list's terminating NULL.
	devs := (*[2]C.ggml_backend_dev_t)(C.calloc(2, C.size_t(unsafe.Sizeof(uintptr(0)))))
	defer C.free(unsafe.Pointer(devs))
	if opts.Device != "" {
		cname := C.CString(opts.Device)
		devs[0] = C.ggml_backend_dev_by_name(cname)
		C.free(unsafe.Pointer(cname))
		if devs[0] == nil {
			return nil, fmt.Errorf("llamaref: ggml has no device %q", opts.Device)
		}
	}
	mp := C.kvr_model_params(C.int(opts.GPULayers), &devs[0])
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	m := &Model{path: path, nbatch: opts.Batch, nctx: opts.Context}
	m.model = C.llama_model_load_from_file(cpath, mp)
	if m.model == nil {
		return nil, fmt.Errorf("llamaref: llama.cpp could not load %s", path)
	}
	flash := 0
	if opts.FlashAttention {
		flash = 1
	}
	swa := 0
	if opts.SWAWindow {
		swa = 1
	}
	cp := C.kvr_ctx_params(C.uint32_t(opts.Context), C.uint32_t(opts.Batch), C.int32_t(opts.Threads), C.int32_t(opts.BatchThreads), kv, C.int(flash), C.int(swa))
	m.ctx = C.llama_init_from_model(m.model, cp)
	if m.ctx == nil {
		C.llama_model_free(m.model)
		return nil, fmt.Errorf("llamaref: llama.cpp could not create a context for %s", path)
	}
	m.vocab = C.llama_model_get_vocab(m.model)
	m.nvocab = int(C.llama_vocab_n_tokens(m.vocab))
	m.batch = C.llama_batch_init(C.int32_t(opts.Batch), 0, 1)
	return m, nil
}

// Close frees the context and the model.
func (m *Model) Close() {
	if m == nil || m.model == nil {
		return
	}
	C.llama_batch_free(m.batch)
	C.llama_free(m.ctx)
	C.llama_model_free(m.model)
	m.model = nil
}

// VocabSize is the number of tokens (and logits per position).
func (m *Model) VocabSize() int { return m.nvocab }

// Len is the number of tokens in the KV cache.
func (m *Model) Len() int { return m.n }

// Reset empties the KV cache.
func (m *Model) Reset() {
	C.llama_memory_clear(C.llama_get_memory(m.ctx), C.bool(true))
	m.n = 0
}

// Truncate keeps the first n tokens of the sequence and drops the rest.
func (m *Model) Truncate(n int) error {
	if n < 0 || n > m.n {
		return fmt.Errorf("llamaref: truncate to %d of %d tokens", n, m.n)
	}
	if !C.llama_memory_seq_rm(C.llama_get_memory(m.ctx), 0, C.llama_pos(n), -1) {
		return errors.New("llamaref: llama.cpp could not remove tokens")
	}
	m.n = n
	return nil
}

// IsEOG reports whether tok ends generation.
func (m *Model) IsEOG(tok int32) bool { return bool(C.llama_vocab_is_eog(m.vocab, C.llama_token(tok))) }

// Append feeds tokens after those already in the cache. It returns the logits
// of every appended position when all is true, otherwise only the last one.
// progress, if not nil, is called after each batch with tokens done so far.
func (m *Model) Append(tokens []int32, all bool, progress func(done int)) ([][]float32, error) {
	if len(tokens) == 0 {
		return nil, errors.New("llamaref: no tokens")
	}
	if m.n+len(tokens) > m.nctx {
		return nil, fmt.Errorf("llamaref: %d tokens exceed the context of %d", m.n+len(tokens), m.nctx)
	}
	for _, t := range tokens {
		if t < 0 || int(t) >= m.nvocab {
			return nil, fmt.Errorf("llamaref: token %d outside the vocabulary of %d", t, m.nvocab)
		}
	}
	var out [][]float32
	for start := 0; start < len(tokens); start += m.nbatch {
		end := min(start+m.nbatch, len(tokens))
		m.batch.n_tokens = C.int32_t(end - start)
		for i := start; i < end; i++ {
			want := all || i == len(tokens)-1
			w := 0
			if want {
				w = 1
			}
			C.kvr_batch_set(&m.batch, C.int(i-start), C.llama_token(tokens[i]), C.llama_pos(m.n+i), C.int(w))
		}
		if rc := C.llama_decode(m.ctx, m.batch); rc != 0 {
			return nil, fmt.Errorf("llamaref: llama_decode returned %d", int(rc))
		}
		for i := start; i < end; i++ {
			if all || i == len(tokens)-1 {
				out = append(out, m.logits(i-start))
			}
		}
		if progress != nil {
			progress(end)
		}
	}
	m.n += len(tokens)
	return out, nil
}

func (m *Model) logits(i int) []float32 {
	p := C.llama_get_logits_ith(m.ctx, C.int32_t(i))
	out := make([]float32, m.nvocab)
	copy(out, unsafe.Slice((*float32)(unsafe.Pointer(p)), m.nvocab))
	return out
}

// Argmax returns the index of the largest value (the first one on ties).
func Argmax(x []float32) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}

// Greedy resets the cache, evaluates prompt and decodes up to n tokens
// greedily, stopping early at an end-of-generation token (not returned).
func (m *Model) Greedy(prompt []int32, n int) ([]int32, error) {
	m.Reset()
	return m.Continue(prompt, n)
}

// Continue appends prompt to what is cached and decodes up to n tokens greedily.
func (m *Model) Continue(prompt []int32, n int) ([]int32, error) {
	lg, err := m.Append(prompt, false, nil)
	if err != nil {
		return nil, err
	}
	var out []int32
	next := Argmax(lg[0])
	for len(out) < n && !m.IsEOG(next) {
		out = append(out, next)
		if len(out) == n {
			break
		}
		lg, err = m.Append([]int32{next}, false, nil)
		if err != nil {
			return out, err
		}
		next = Argmax(lg[0])
	}
	return out, nil
}

// Tokenize converts text with llama.cpp's tokenizer (BOS added when the model asks for it
// and addSpecial is true).
func (m *Model) Tokenize(text string, addSpecial bool) ([]int32, error) {
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	buf := make([]C.llama_token, len(text)+8)
	n := C.llama_tokenize(m.vocab, ctext, C.int32_t(len(text)), &buf[0], C.int32_t(len(buf)), C.bool(addSpecial), C.bool(true))
	if n < 0 {
		buf = make([]C.llama_token, -n)
		n = C.llama_tokenize(m.vocab, ctext, C.int32_t(len(text)), &buf[0], C.int32_t(len(buf)), C.bool(addSpecial), C.bool(true))
	}
	if n < 0 {
		return nil, errors.New("llamaref: tokenize failed")
	}
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(buf[i])
	}
	return out, nil
}

// Piece returns the text of one token.
func (m *Model) Piece(tok int32) string {
	var buf [256]C.char
	n := C.llama_token_to_piece(m.vocab, C.llama_token(tok), &buf[0], C.int32_t(len(buf)), 0, C.bool(false))
	if n < 0 {
		return ""
	}
	return C.GoStringN(&buf[0], n)
}
