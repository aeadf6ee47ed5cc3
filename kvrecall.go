// Package kvrecall is the stable Go API of kvrecall, a runtime for
// long-context LLM inference on GGUF models whose KV cache lives in pages in
// host memory and on disk.
//
// Open a model, then generate from a prompt (Generate, Stream), from chat
// messages with the model's chat template (Chat, ChatStream), or ingest a
// long text once as a Document and ask it many questions (Document.Ask,
// Document.Chat): each question reuses the document's pages and attends to
// a budget of them chosen by a paging method ("retro", "quest", "dense",
// ...), set per call.
//
// Every response carries Usage: prompt and completion tokens, the document
// tokens reused instead of evaluated, and the KV pages retrieved from host
// memory. A Model and its Documents are safe for concurrent use: each call
// runs in its own session. Cancelling a call's context stops prefill
// between batches and decoding between tokens.
//
// Its exported API uses only the standard library and this package's own
// types (a test enforces it). The packages beside it (runtime, kvcache,
// paging, heads, probe, ...) are kvrecall's engine: importable for
// research, but without this package's stability promise.
package kvrecall

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/kvrecall/kvrecall/internal/chat"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/store"
)

// Options configure Open. Zero values pick the documented defaults.
type Options struct {
	// Threads for the CPU backend; 0 means one per CPU.
	Threads int
	// ContextLength is the most tokens one call holds: document, prompt
	// and answer. 0 means the model's trained context, capped at 8192.
	ContextLength int
	// BatchSize is the tokens per forward pass during prefill (default
	// 512, at most 4096); cancellation is checked between batches.
	BatchSize int
	// PageSize is the tokens per KV page of documents (16..256, default 64).
	PageSize int
	// DataDir holds ingested documents (default: a folder per model under
	// the user cache directory). One process owns it at a time.
	DataDir string
	// MaxDocumentBytes bounds the host memory of opened documents; the
	// least recently used ones beyond it reload from disk when next used.
	// 0 means 4 GiB, negative means no bound.
	MaxDocumentBytes int64
	// Method and Budget are the defaults of calls that set none: the
	// paging method of calls on a document (default "retro") and the
	// tokens each query attends to (default 2048).
	Method string
	Budget int
	// HeadsProfile is the head profile of "+heads" methods: a profile
	// file (from `kvrecall heads detect`), "half" for a synthetic one, or
	// "" for the retrieval heads the model records.
	HeadsProfile string
	// Device is where the model's layers run: "" or "cpu", "gpu" (the
	// first GPU), or a device name from `kvrecall devices` ("CUDA0"). GPUs
	// need a ggml backend library loaded at start (docs/gpu.md).
	Device string
	// GPULayers is how many layers a GPU Device gets, counted as
	// llama.cpp's -ngl (the last GPULayers); 0 means all.
	GPULayers int
	// LoadProgress, if set, is called with the fraction of weights loaded.
	LoadProgress func(fraction float32)
	// Store is a shared document store that several processes use:
	// redis://[user:password@]host:port[/db], rediss://... or
	// file:///path. Documents ingested by any of them are answered by all
	// without prefill; DataDir stays the local tier. A store that cannot
	// be reached is not an error: documents are then prefilled and served
	// locally (see docs/store.md). "" means none.
	Store string
}

// Errors that callers can test with errors.Is.
var (
	// ErrClosed: the model was closed.
	ErrClosed = runtime.ErrClosed
	// ErrNoDocument: no document is stored under the id.
	ErrNoDocument = runtime.ErrNoDocument
	// ErrContextFull: the document, prompt and answer do not fit the context length.
	ErrContextFull = runtime.ErrContextFull
	// ErrToolCall: the model wrote a tool call that cannot be used (an
	// unknown tool, malformed JSON, an unterminated <tool_call>).
	ErrToolCall = chat.ErrToolCall
	// ErrFormat: GenerateOptions.Format is neither "json" nor a JSON
	// Schema the grammar converter can handle.
	ErrFormat = runtime.ErrFormat
)

// OpenError names the model file and what is wrong with it (truncated,
// not GGUF, unsupported architecture, missing tensor, wrong shape, ...).
type OpenError struct {
	Path string
	Err  error
}

func (e *OpenError) Error() string { return fmt.Sprintf("open model %s: %v", e.Path, e.Err) }
func (e *OpenError) Unwrap() error { return e.Err }

// Model is a loaded GGUF model. It is safe for concurrent use.
type Model struct {
	rt     *runtime.Model
	tpl    *chat.Template
	opts   Options
	shared *store.Store // Options.Store, opened here, closed after the model
}

// Open checks and loads the GGUF model at path (llama, qwen2, qwen3, phi3,
// gemma2 and gemma3 architectures; f32, f16 and ggml's quantized weight types). A bad
// file gives an *OpenError, never a panic. ctx cancels the load.
func Open(ctx context.Context, path string, opts Options) (*Model, error) {
	if opts.Budget < 0 {
		return nil, fmt.Errorf("Options.Budget %d is negative", opts.Budget)
	}
	if opts.Method == "" {
		opts.Method = "retro"
	}
	if _, _, err := paging.Parse(opts.Method); err != nil {
		return nil, fmt.Errorf("Options.Method: %w", err)
	}
	var shared *store.Store
	if opts.Store != "" {
		var err error
		if shared, err = store.Open(opts.Store); err != nil {
			return nil, fmt.Errorf("Options.Store: %w", err)
		}
	}
	rm, err := runtime.Open(ctx, path, runtime.Options{
		Threads: opts.Threads, ContextLength: opts.ContextLength, BatchSize: opts.BatchSize,
		PageSize: opts.PageSize, DataDir: opts.DataDir, MaxDocumentBytes: opts.MaxDocumentBytes,
		LoadProgress: opts.LoadProgress, Store: shared, Device: opts.Device, GPULayers: opts.GPULayers,
	})
	if err != nil {
		if shared != nil {
			shared.Close()
		}
		var oe *runtime.OpenError
		if errors.As(err, &oe) {
			return nil, &OpenError{Path: oe.Path, Err: oe.Err}
		}
		return nil, err
	}
	tpl, err := chat.ForModel(rm)
	if err == nil {
		err = runtime.ApplyHeadProfile(rm, opts.HeadsProfile)
	}
	if err != nil {
		rm.Close()
		if shared != nil {
			shared.Close()
		}
		return nil, &OpenError{Path: path, Err: err}
	}
	ro := rm.Options()
	opts.Threads, opts.ContextLength, opts.BatchSize = ro.Threads, ro.ContextLength, ro.BatchSize
	opts.PageSize, opts.DataDir, opts.MaxDocumentBytes = ro.PageSize, ro.DataDir, ro.MaxDocumentBytes
	if opts.Budget == 0 {
		opts.Budget = paging.DefaultBudget
	}
	return &Model{rt: rm, tpl: tpl, opts: opts, shared: shared}, nil
}

// Close frees the model. It waits for forward passes in flight (cancel
// their contexts first so that they stop at the next batch or token);
// calls made afterwards fail with ErrClosed. Closing twice is harmless.
func (m *Model) Close() error {
	m.rt.Close()
	if m.shared != nil {
		m.shared.Close()
	}
	return nil
}

// Options returns the options in effect, defaults filled in.
func (m *Model) Options() Options { return m.opts }

// ModelInfo describes a loaded model.
type ModelInfo struct {
	Path          string
	Arch          string // llama, qwen2, qwen3, phi3, gemma2 or gemma3
	Layers        int
	Heads         int // query heads per layer
	KVHeads       int
	HeadDim       int
	Vocab         int
	ContextLength int // the context in effect (Options.ContextLength)
	Trained       int // the context the model was trained for (0: unknown)
	// ChatTemplate is the model's Jinja chat template; "" means the
	// fallback: the messages' contents joined by blank lines.
	ChatTemplate string
	// Device names where the offloaded layers run ("CUDA0 (NVIDIA H200,
	// gpu, loaded)"), or the CPU device when none is offloaded; GPULayers
	// of Layers+1 (the output layer counts) are on it.
	Device    string
	GPULayers int
}

// Info describes the model.
func (m *Model) Info() ModelInfo {
	c := m.rt.Config()
	return ModelInfo{Path: m.rt.Path(), Arch: c.Arch, Layers: c.Layers, Heads: c.Heads, KVHeads: c.KVHeads,
		HeadDim: c.HeadDim, Vocab: c.Vocab, ContextLength: m.opts.ContextLength, Trained: c.ContextLength,
		ChatTemplate: m.tpl.Source(), Device: m.rt.Device().Device.String(), GPULayers: m.rt.Device().GPULayers}
}

// CountTokens returns the number of tokens text takes (without BOS).
func (m *Model) CountTokens(text string) (int, error) {
	t, err := m.rt.Tokenizer().Encode(text, false)
	return len(t), err
}

// Tokenize returns the tokens of text, without BOS.
func (m *Model) Tokenize(text string) ([]int32, error) { return m.rt.Tokenizer().Encode(text, false) }

// Detokenize returns the text of tokens.
func (m *Model) Detokenize(ids []int32) (string, error) { return m.rt.Tokenizer().Decode(ids) }

// Methods lists the registered paging methods ("dense", "quest", "retro",
// ...); a method may carry modifiers ("retro+heads").
func Methods() []string { return paging.Names() }

// Sampling chooses each next token. The zero value is greedy.
type Sampling struct {
	Temperature   float32 // 0 picks the most likely token
	TopK          int     // keep the k most likely tokens; 0 keeps all
	TopP          float32 // nucleus sampling; 0 or 1 disables
	MinP          float32 // drop tokens below MinP x the top probability; 0 disables
	Seed          int     // random seed; -1 draws one
	RepeatPenalty float32 // >1 discourages tokens seen in the last RepeatLastN; 0 or 1 disables
	RepeatLastN   int     // window for RepeatPenalty (default 64)
}

// GenerateOptions control one call.
type GenerateOptions struct {
	// MaxTokens caps the answer; 0 means until the context is full.
	MaxTokens int
	Sampling  Sampling
	// Stop ends the answer at the first of these strings (not returned).
	Stop []string
	// OnToken, if set, receives the answer as it is generated: each token
	// with the text it releases (text that may begin a stop string is held
	// back). Returning an error stops generation; the call returns it.
	OnToken func(Token) error
	// OnPrefill, if set, reports prompt evaluation: done of total tokens.
	OnPrefill func(done, total int)

	// Document, on a Model's Generate, Stream, Chat or ChatStream, answers
	// after this ingested document's pages instead of from nothing (the
	// same as calling the Document's method).
	Document string
	// Method is the paging method: on a document, which of its pages each
	// query attends to (default Options.Method); without a document, ""
	// attends to every token and a method name pages the call's own
	// prompt the same way.
	Method string
	// Budget is the tokens each query attends to under Method, sinks and
	// recent window included (default Options.Budget).
	Budget int

	// Tools, for Chat and ChatStream, are the functions the model may
	// call: the chat template lists them, and calls in the answer
	// (Hermes/Qwen <tool_call> JSON, Llama 3 JSON) come back whole in
	// Response.ToolCalls. OnToken and streams never see a call's text.
	Tools []Tool
	// ToolChoice, with Tools: "" or "auto" lets the model choose between
	// text and calls; "none" offers no tools; "required" forces a call
	// to one of the tools and a tool's name a call to that tool. A forced
	// call is generated under a grammar (as Format does): the JSON object
	// {"name": ..., "arguments": {...}} whose arguments follow the tool's
	// Parameters schema.
	ToolChoice string

	// Format constrains the answer with llama.cpp's grammar sampler, as
	// Ollama's `format` does: nil for free text, json.RawMessage(`"json"`)
	// for one JSON object, or a JSON Schema object the answer follows
	// (json_schema_to_grammar's subset: types, properties, required,
	// additionalProperties, enum, const, anyOf/oneOf/allOf, items, local
	// $refs, string and array lengths, integer ranges, ^...$ patterns).
	// The model may end only where the JSON is complete, so a MaxTokens
	// that cuts it short leaves it incomplete (StopLength): in JSON mode
	// strings are unbounded; a schema can bound them with maxLength. A
	// format the grammar cannot be built from is an error wrapping
	// ErrFormat that names the offending keyword.
	Format json.RawMessage
}

// Tool is a function the model may call.
type Tool struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"` // JSON Schema of the arguments; nil: none
}

// ToolCall is a call the model made.
type ToolCall struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"` // a JSON object
}

// Token is one generated token and the text it released. ID is -1 for
// text released at the end (held back until then).
type Token struct {
	ID   int32
	Text string
}

// StopReason says why an answer ended.
type StopReason string

const (
	StopEOG       StopReason = "eog"       // the model produced an end-of-generation token
	StopString    StopReason = "stop"      // a stop string appeared
	StopLength    StopReason = "length"    // MaxTokens reached
	StopContext   StopReason = "context"   // the context is full
	StopCancelled StopReason = "cancelled" // the call's context was cancelled
)

// Usage counts a call's tokens and pages. The prompt counts as OpenAI's
// prompt_tokens do: it includes the document's tokens, of which
// CachedTokens were reused rather than evaluated again.
type Usage struct {
	PromptTokens     int // document + prompt
	CompletionTokens int // generated tokens
	TotalTokens      int // PromptTokens + CompletionTokens
	CachedTokens     int // document tokens reused, not evaluated
	// PagesRetrieved is the KV pages copied from host memory into
	// attention during the call, counted per layer and head group (a
	// dense call on a 64-page document in a 2-layer model retrieves 128);
	// 0 for calls without a document or method.
	PagesRetrieved int
	// RetrievedKVBytes is the KV bytes copied into attention during the
	// call, pages and single tokens alike: a token-granular method
	// (squeezed) retrieves tokens, not pages, so its PagesRetrieved is 0
	// and this counts what it moved.
	RetrievedKVBytes int64
	// ResidentKVBytes is the KV cache held for attention at the end of
	// the call (0 for dense calls without a document).
	ResidentKVBytes int64
}

// Response is a finished (or stopped) call.
type Response struct {
	Text       string // the answer, without its tool calls
	ToolCalls  []ToolCall
	TokenIDs   []int32
	StopReason StopReason
	Usage      Usage
	Prefill    time.Duration // evaluating the prompt
	Decode     time.Duration // generating the answer
}

// Chunk is one step of a stream: a token's text, or, last, the whole
// Response with its usage.
type Chunk struct {
	Token Token
	// Response is set on the last chunk only (whose Token is empty).
	Response *Response
}

// Generate continues prompt (tokenized with BOS unless opts.Document is
// set). On cancellation it returns the partial response and ctx's error.
func (m *Model) Generate(ctx context.Context, prompt string, opts GenerateOptions) (*Response, error) {
	var doc *runtime.Document
	if opts.Document != "" {
		var err error
		if doc, err = m.rt.OpenDocument(opts.Document); err != nil {
			return nil, err
		}
	}
	return m.generate(ctx, doc, prompt, doc == nil, opts)
}

// Stream is Generate as an iterator: one chunk per token, then a last
// chunk with the Response. Breaking out of the loop stops generation.
func (m *Model) Stream(ctx context.Context, prompt string, opts GenerateOptions) iter.Seq2[Chunk, error] {
	return stream(opts, func(o GenerateOptions) (*Response, error) { return m.Generate(ctx, prompt, o) })
}

// Message is one chat turn; Role is system, user, assistant or tool. An
// assistant turn's ToolCalls are given back to the template.
type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

// ChatPrompt renders msgs (and tools, if any) with the model's chat
// template, ending where the assistant's reply starts: the prompt Chat
// generates from. afterDocument leaves the BOS token out (a document
// already starts with it).
func (m *Model) ChatPrompt(msgs []Message, tools []Tool, afterDocument bool) (string, error) {
	cm := make([]chat.Message, len(msgs))
	for i, x := range msgs {
		cm[i] = chat.Message{Role: x.Role, Content: x.Content}
		for _, tc := range x.ToolCalls {
			cm[i].ToolCalls = append(cm[i].ToolCalls, chat.ToolCall(tc))
		}
	}
	return m.tpl.RenderTools(cm, chatTools(tools), !afterDocument)
}

func chatTools(tools []Tool) []chat.Tool {
	out := make([]chat.Tool, len(tools))
	for i, t := range tools {
		out[i] = chat.Tool(t)
	}
	return out
}

// Chat answers msgs, rendered with the model's chat template (see
// ChatPrompt and ModelInfo.ChatTemplate).
func (m *Model) Chat(ctx context.Context, msgs []Message, opts GenerateOptions) (*Response, error) {
	var doc *runtime.Document
	if opts.Document != "" {
		var err error
		if doc, err = m.rt.OpenDocument(opts.Document); err != nil {
			return nil, err
		}
	}
	return m.chat(ctx, doc, msgs, opts)
}

// ChatStream is Chat as an iterator, like Stream.
func (m *Model) ChatStream(ctx context.Context, msgs []Message, opts GenerateOptions) iter.Seq2[Chunk, error] {
	return stream(opts, func(o GenerateOptions) (*Response, error) { return m.Chat(ctx, msgs, o) })
}

func (m *Model) chat(ctx context.Context, doc *runtime.Document, msgs []Message, opts GenerateOptions) (*Response, error) {
	offered, forced, err := chat.ToolChoice(chatTools(opts.Tools), opts.ToolChoice)
	if err != nil {
		return nil, fmt.Errorf("GenerateOptions.ToolChoice: %w", err)
	}
	if forced != nil {
		if len(opts.Format) > 0 && string(opts.Format) != "null" {
			return nil, fmt.Errorf("GenerateOptions.ToolChoice %q forces a tool call, which cannot also follow GenerateOptions.Format", opts.ToolChoice)
		}
		opts.Format = forced
	}
	tools := offered
	opts.Tools = make([]Tool, len(offered))
	for i, t := range offered {
		opts.Tools[i] = Tool(t)
	}
	p, err := m.ChatPrompt(msgs, opts.Tools, doc != nil)
	if err != nil {
		return nil, err
	}
	user := opts.OnToken
	filter := chat.NewToolFilter(tools)
	if user != nil && len(tools) > 0 {
		// Text that is or may become a tool call is held back.
		opts.OnToken = func(t Token) error {
			if s := filter.Add(t.Text); s != "" {
				return user(Token{ID: t.ID, Text: s})
			}
			return nil
		}
	}
	opts.Tools, opts.ToolChoice = nil, ""
	// A template that writes bos_token itself must not get a second BOS.
	res, err := m.generate(ctx, doc, p, doc == nil && !m.tpl.StartsWithBOS(p), opts)
	if res == nil || len(tools) == 0 {
		return res, err
	}
	// Under a forced call what the filter holds at the end is a cut-off
	// call, never text to release.
	if rest := filter.Flush(); rest != "" && user != nil && err == nil && forced == nil {
		err = user(Token{ID: -1, Text: rest})
	}
	content, calls, perr := chat.ParseToolCalls(res.Text, tools)
	if perr != nil && (res.StopReason == StopLength || res.StopReason == StopContext) {
		// The model did not write bad JSON: the limit cut its call short.
		perr = fmt.Errorf("%w; the answer was cut off (stop reason %s): raise the token limit", perr, res.StopReason)
	}
	if perr == nil && forced != nil {
		perr = chat.CheckForced(res.Text, calls, "stop reason "+string(res.StopReason))
	}
	if perr != nil {
		if err == nil {
			err = perr
		}
		return res, err
	}
	res.Text = content
	for _, c := range calls {
		res.ToolCalls = append(res.ToolCalls, ToolCall(c))
	}
	return res, err
}

// policy fills a call's method and budget from the model's defaults.
func (m *Model) policy(opts GenerateOptions, doc bool) (runtime.PolicyOptions, bool, error) {
	if opts.Budget < 0 {
		return runtime.PolicyOptions{}, false, fmt.Errorf("GenerateOptions.Budget %d is negative", opts.Budget)
	}
	if opts.MaxTokens < 0 {
		return runtime.PolicyOptions{}, false, fmt.Errorf("GenerateOptions.MaxTokens %d is negative", opts.MaxTokens)
	}
	p := runtime.PolicyOptions{Policy: opts.Method, Budget: opts.Budget}
	if p.Policy == "" {
		if !doc {
			return p, false, nil // a plain dense session
		}
		p.Policy = m.opts.Method
	}
	if p.Budget == 0 {
		p.Budget = m.opts.Budget
	}
	if _, _, err := paging.Parse(p.Policy); err != nil {
		return p, false, fmt.Errorf("GenerateOptions.Method: %w", err)
	}
	return p, true, nil
}

// generate runs one call in its own session: after doc's pages when doc
// is set, else from nothing.
func (m *Model) generate(ctx context.Context, doc *runtime.Document, prompt string, bos bool, opts GenerateOptions) (*Response, error) {
	if len(opts.Tools) > 0 {
		return nil, errors.New("GenerateOptions.Tools need a chat template: use Chat or ChatStream")
	}
	if opts.ToolChoice != "" {
		return nil, errors.New("GenerateOptions.ToolChoice needs Tools and a chat template: use Chat or ChatStream")
	}
	grammar, err := runtime.FormatGrammar(opts.Format)
	if err != nil {
		return nil, fmt.Errorf("GenerateOptions.Format: %w", err)
	}
	pol, paged, err := m.policy(opts, doc != nil)
	if err != nil {
		return nil, err
	}
	if prompt == "" && doc == nil {
		// Without a document there is nothing to continue (after one, an
		// empty prompt continues the document).
		return nil, errors.New("empty prompt")
	}
	toks, err := m.rt.Tokenizer().Encode(prompt, bos)
	if err != nil {
		return nil, err
	}
	var s *runtime.Session
	switch {
	case doc != nil:
		s, err = m.rt.DocumentSessionContext(ctx, doc, pol)
	case paged:
		s, err = m.rt.NewSessionWith(runtime.PagedCache(pol))
	default:
		s, err = m.rt.NewSession()
	}
	if err != nil {
		return nil, err
	}
	defer s.Close()
	ro := runtime.GenerateOptions{MaxTokens: opts.MaxTokens, Sampling: runtime.Sampling(opts.Sampling), Stop: opts.Stop, Grammar: grammar}
	if opts.OnToken != nil {
		ro.OnToken = func(t runtime.Token) error { return opts.OnToken(Token{ID: t.ID, Text: t.Text}) }
	}
	if opts.OnPrefill != nil {
		ro.OnPrefill = runtime.Progress(opts.OnPrefill)
	}
	res, err := s.Generate(ctx, toks, ro)
	if res == nil {
		return nil, err
	}
	out := &Response{Text: res.Text, TokenIDs: res.Tokens, StopReason: StopReason(res.StopReason),
		Prefill: res.PrefillDuration, Decode: res.DecodeDuration,
		Usage: Usage{PromptTokens: res.PromptTokens + res.CachedTokens, CompletionTokens: res.GeneratedTokens,
			TotalTokens: res.PromptTokens + res.CachedTokens + res.GeneratedTokens, CachedTokens: res.CachedTokens}}
	if pc, ok := s.Cache().(*kvcache.Paged); ok {
		st := pc.Stats()
		out.Usage.PagesRetrieved, out.Usage.ResidentKVBytes = int(st.Uploads), st.ResidentBytes
		out.Usage.RetrievedKVBytes = st.UploadedBytes
	}
	return out, err
}

// stream turns a call with an OnToken callback into an iterator. Never
// yields again after yield returned false.
func stream(opts GenerateOptions, call func(GenerateOptions) (*Response, error)) iter.Seq2[Chunk, error] {
	return func(yield func(Chunk, error) bool) {
		stopped := false
		user := opts.OnToken
		opts.OnToken = func(t Token) error {
			if user != nil {
				if err := user(t); err != nil {
					return err
				}
			}
			if !yield(Chunk{Token: t}, nil) {
				stopped = true
				return errStopped
			}
			return nil
		}
		res, err := call(opts)
		switch {
		case stopped:
		case err != nil:
			yield(Chunk{Response: res}, err)
		default:
			yield(Chunk{Response: res}, nil)
		}
	}
}

var errStopped = errors.New("stream stopped by the caller")

// IngestOptions control Ingest.
type IngestOptions struct {
	// Progress, if set, reports the prefill: done of total tokens.
	Progress func(done, total int)
}

// Document is a text prefilled once whose pages live in host memory and
// on disk; every question reuses them, also in later processes (see
// Model.Document). It is safe for concurrent use.
type Document struct {
	m *Model
	d *runtime.Document
}

// DocumentInfo describes a stored document.
type DocumentInfo struct {
	ID         string
	Tokens     int
	Pages      int
	PageSize   int
	HostBytes  int64 // its pages in host memory
	TextSHA256 string
	Created    time.Time
	Prefill    time.Duration // the ingest's prefill
	// FromStore says that this process fetched the pages from
	// Options.Store instead of prefilling them (Prefill is then the
	// original ingest's).
	FromStore bool
}

func infoOf(in runtime.Info) DocumentInfo {
	return DocumentInfo{ID: in.ID, Tokens: in.Tokens, Pages: in.Pages, PageSize: in.PageSize, HostBytes: in.HostBytes,
		TextSHA256: in.TextSHA256, Created: in.Created, Prefill: time.Duration(in.PrefillSeconds * float64(time.Second)),
		FromStore: in.Source == "shared"}
}

// Ingest tokenizes text (with BOS), prefills it once and stores its pages
// under id (letters, digits, '.', '_', '-'; "" names it by a hash of the
// text). Ingesting the same text under the same id again returns the
// stored document without prefilling; other text replaces it atomically.
func (m *Model) Ingest(ctx context.Context, id, text string, opts IngestOptions) (*Document, error) {
	d, err := m.rt.Ingest(ctx, id, text, runtime.Progress(opts.Progress))
	if err != nil {
		return nil, err
	}
	return &Document{m: m, d: d}, nil
}

// Document opens a stored document (ingested by this or an earlier
// process), verifying its pages; ErrNoDocument if there is none.
func (m *Model) Document(id string) (*Document, error) {
	d, err := m.rt.OpenDocument(id)
	if err != nil {
		return nil, err
	}
	return &Document{m: m, d: d}, nil
}

// Documents lists the documents stored for this model, by id.
func (m *Model) Documents() ([]DocumentInfo, error) {
	ins, err := m.rt.Documents()
	out := make([]DocumentInfo, len(ins))
	for i, in := range ins {
		out[i] = infoOf(in)
	}
	return out, err
}

// DeleteDocument removes a document from memory and disk.
func (m *Model) DeleteDocument(id string) error { return m.rt.DeleteDocument(id) }

// ID is the document's id.
func (d *Document) ID() string { return d.d.ID }

// Info describes the document.
func (d *Document) Info() DocumentInfo { return infoOf(d.d.Info) }

// Ask appends question (without BOS) after the document and answers it
// under opts.Method and opts.Budget, without prefilling the document again.
func (d *Document) Ask(ctx context.Context, question string, opts GenerateOptions) (*Response, error) {
	if err := d.check(opts); err != nil {
		return nil, err
	}
	return d.m.generate(ctx, d.d, question, false, opts)
}

// AskStream is Ask as an iterator, like Model.Stream.
func (d *Document) AskStream(ctx context.Context, question string, opts GenerateOptions) iter.Seq2[Chunk, error] {
	return stream(opts, func(o GenerateOptions) (*Response, error) { return d.Ask(ctx, question, o) })
}

// Chat answers msgs after the document: the messages are rendered with
// the model's chat template (without BOS) and appended to its pages.
func (d *Document) Chat(ctx context.Context, msgs []Message, opts GenerateOptions) (*Response, error) {
	if err := d.check(opts); err != nil {
		return nil, err
	}
	return d.m.chat(ctx, d.d, msgs, opts)
}

// ChatStream is Chat as an iterator, like Model.Stream.
func (d *Document) ChatStream(ctx context.Context, msgs []Message, opts GenerateOptions) iter.Seq2[Chunk, error] {
	return stream(opts, func(o GenerateOptions) (*Response, error) { return d.Chat(ctx, msgs, o) })
}

func (d *Document) check(opts GenerateOptions) error {
	if opts.Document != "" && opts.Document != d.d.ID {
		return fmt.Errorf("GenerateOptions.Document %q names another document than %q", opts.Document, d.d.ID)
	}
	return nil
}

// String names the document for logs.
func (d *Document) String() string {
	return fmt.Sprintf("document %s (%d tokens, %d pages)", d.d.ID, d.d.Tokens, d.d.Pages)
}
