// Package store is kvrecall's shared document tier: ingested documents
// (their page file, Squeezed-Attention clusters and probe representatives)
// stored once under a content address and read by every process that uses
// the same model, the way LMCache keeps vLLM's KV cache in Redis.
//
// A document is a set of named files. Each file is cut into chunks of at
// most ChunkSize bytes; every chunk is stored under its own key with its
// sha256 in the document's manifest, and is verified when read. The
// manifest is written last, and only if no manifest exists (SET NX): a
// document is visible only once all its chunks are, and of two processes
// storing the same document at once one copy is kept (the other deletes
// its chunks). A chunk that is missing (evicted under maxmemory) or fails
// its checksum makes Get fail with ErrDamaged and removes the manifest, so
// that the next ingest stores the document again.
//
// Two back ends implement Backend: Redis (redis://, rediss://) and a
// directory (file://, for a shared filesystem and for tests).
//
// Tier is the document-level interface the runtime keeps its documents
// behind, by id, with two implementations: Local (the process's own data
// folder, runtime Options.DataDir) and Shared (a Store). With a store,
// Local is the cache tier in front of Shared (see tier.go).
package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
)

// DefaultChunkSize bounds one stored value: Redis blocks while it copies a
// value, so values stay small (4 MiB is ~1.3k tokens of a 1B model's
// pages).
const DefaultChunkSize = 4 << 20

// ErrNotFound means no complete document is stored under a key or name.
var ErrNotFound = errors.New("not in the shared store")

// ErrDamaged means a stored document lost a chunk or a chunk failed its
// checksum. Its manifest has been removed.
var ErrDamaged = errors.New("shared copy damaged")

// ErrUnavailable wraps every error from reaching the back end (Redis down,
// a timeout): the caller may fall back to its local tier.
var ErrUnavailable = errors.New("shared store unavailable")

// Backend is the key-value service under a Store. Keys are short ASCII
// strings; values are bytes. Errors reaching the service must wrap
// ErrUnavailable; a missing key is (nil, false, nil).
type Backend interface {
	Get(ctx context.Context, key string) ([]byte, bool, error)
	Set(ctx context.Context, key string, v []byte) error
	// SetNX sets key only if it does not exist and says whether it did.
	SetNX(ctx context.Context, key string, v []byte) (bool, error)
	// DelIfEqual deletes key only if it still holds v (a manifest that
	// another process may have replaced since it was read).
	DelIfEqual(ctx context.Context, key string, v []byte) error
	Del(ctx context.Context, keys ...string) error
	Ping(ctx context.Context) error
	Close() error
}

// File is one named file of a document. Its content is Data, or what Write
// writes (streamed: a page file of gigabytes is not held in memory twice
// on its way to disk), or the file at Path on the local disk (what Local's
// View gives; read it with its format's reader, which checks its
// checksums). Store.Get returns Data.
type File struct {
	Name  string
	Data  []byte
	Write func(io.Writer) error
	Path  string
}

// Document is what is stored under a content address: the document's
// metadata (opaque JSON to this package) and its files.
type Document struct {
	Meta  json.RawMessage
	Files []File
}

// manifest is the JSON written last under the manifest key.
type manifest struct {
	Version int             `json:"version"`
	Writer  string          `json:"writer"` // random per Put: names its chunks
	Meta    json.RawMessage `json:"meta"`
	Files   []fileEntry     `json:"files"`
}

type fileEntry struct {
	Name   string       `json:"name"`
	Size   int          `json:"size"`
	Chunks []chunkEntry `json:"chunks"`
}

type chunkEntry struct {
	Size   int    `json:"size"`
	SHA256 string `json:"sha256"`
}

const manifestVersion = 1

// Stats counts a Store's traffic since it was opened.
type Stats struct {
	Puts         uint64 `json:"puts"`          // documents offered
	Kept         uint64 `json:"kept"`          // of them, stored (the rest were there already)
	Gets         uint64 `json:"gets"`          // documents fetched
	Damaged      uint64 `json:"damaged"`       // fetches that found a chunk missing or corrupt
	BytesWritten uint64 `json:"bytes_written"` // chunk and manifest bytes sent
	BytesRead    uint64 `json:"bytes_read"`    // chunk and manifest bytes received
}

// Store keeps documents in a Backend under a key prefix.
type Store struct {
	b         Backend
	url       string // for messages and /health, without credentials
	prefix    string
	ChunkSize int

	puts, kept, gets, damaged atomic.Uint64
	written, read             atomic.Uint64
}

// New wraps a back end; desc names it in messages.
func New(b Backend, desc string) *Store {
	return &Store{b: b, url: desc, prefix: "kvrecall:", ChunkSize: DefaultChunkSize}
}

// Open opens the store a URL names: redis://[user:password@]host:port[/db],
// rediss://... (TLS), or file:///path. It does not contact the service:
// Ping says whether it is reachable.
func Open(raw string) (*Store, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("store %q: %v", raw, err)
	}
	switch u.Scheme {
	case "redis", "rediss":
		b, err := openRedis(raw)
		if err != nil {
			return nil, fmt.Errorf("store %s: %v", u.Redacted(), err)
		}
		return New(b, u.Redacted()), nil
	case "file":
		if u.Path == "" || u.Host != "" {
			return nil, fmt.Errorf("store %q: write file:///absolute/path", raw)
		}
		b, err := OpenDir(u.Path)
		if err != nil {
			return nil, err
		}
		return New(b, "file://"+u.Path), nil
	default:
		return nil, fmt.Errorf("store %q: unknown scheme %q (redis://host:port, rediss://..., file:///path)", raw, u.Scheme)
	}
}

// String names the store (credentials removed).
func (s *Store) String() string { return s.url }

// Close closes the back end.
func (s *Store) Close() error { return s.b.Close() }

// Ping checks that the back end answers.
func (s *Store) Ping(ctx context.Context) error { return s.b.Ping(ctx) }

// Stats returns the traffic so far.
func (s *Store) Stats() Stats {
	return Stats{Puts: s.puts.Load(), Kept: s.kept.Load(), Gets: s.gets.Load(), Damaged: s.damaged.Load(),
		BytesWritten: s.written.Load(), BytesRead: s.read.Load()}
}

// Key layout (see docs/store.md):
//
//	kvrecall:doc:<content>                      manifest (JSON), written last
//	kvrecall:chunk:<content>:<writer>:<file>:<i> chunk i of a file
//	kvrecall:name:<model>:<id>                  content address of a document id
func (s *Store) manifestKey(content string) string { return s.prefix + "doc:" + content }
func (s *Store) chunkKey(content, writer, file string, i int) string {
	return fmt.Sprintf("%schunk:%s:%s:%s:%d", s.prefix, content, writer, file, i)
}
func (s *Store) nameKey(model, id string) string { return s.prefix + "name:" + model + ":" + id }

// Has says whether a complete copy's manifest is stored under content.
func (s *Store) Has(ctx context.Context, content string) (bool, error) {
	_, ok, err := s.b.Get(ctx, s.manifestKey(content))
	return ok, err
}

// Put stores doc under content unless a copy is already there. kept says
// whether this call's copy is the stored one; false with a nil error means
// another process's copy was there first (or won the race), and this
// call's chunks were removed.
func (s *Store) Put(ctx context.Context, content string, doc Document) (kept bool, err error) {
	if !validKeyPart(content) {
		return false, fmt.Errorf("store: invalid content address %q", content)
	}
	s.puts.Add(1)
	mk := s.manifestKey(content)
	if _, ok, err := s.b.Get(ctx, mk); err != nil || ok {
		return false, err
	}
	var w [8]byte
	rand.Read(w[:])
	m := manifest{Version: manifestVersion, Writer: hex.EncodeToString(w[:]), Meta: doc.Meta}
	var written []string
	cleanup := func() {
		// Best effort, with a fresh context: the caller's may be done.
		if len(written) > 0 {
			s.b.Del(context.WithoutCancel(ctx), written...)
		}
	}
	size := s.ChunkSize
	if size <= 0 {
		size = DefaultChunkSize
	}
	for _, f := range doc.Files {
		if !validKeyPart(f.Name) {
			cleanup()
			return false, fmt.Errorf("store: invalid file name %q", f.Name)
		}
		if f.Data == nil {
			if f.Data, err = f.Bytes(); err != nil {
				cleanup()
				return false, fmt.Errorf("store: %s: %w", f.Name, err)
			}
		}
		fe := fileEntry{Name: f.Name, Size: len(f.Data)}
		for i, off := 0, 0; off < len(f.Data) || (i == 0 && len(f.Data) == 0); i, off = i+1, off+size {
			c := f.Data[off:min(off+size, len(f.Data))]
			k := s.chunkKey(content, m.Writer, f.Name, i)
			if err := s.b.Set(ctx, k, c); err != nil {
				cleanup()
				return false, err
			}
			written = append(written, k)
			s.written.Add(uint64(len(c)))
			sum := sha256.Sum256(c)
			fe.Chunks = append(fe.Chunks, chunkEntry{Size: len(c), SHA256: hex.EncodeToString(sum[:])})
			if len(f.Data) == 0 {
				break
			}
		}
		m.Files = append(m.Files, fe)
	}
	b, err := json.Marshal(m)
	if err != nil {
		cleanup()
		return false, err
	}
	ok, err := s.b.SetNX(ctx, mk, b)
	if err != nil || !ok {
		// Another writer's manifest is there: its copy is the one kept.
		cleanup()
		return false, err
	}
	s.written.Add(uint64(len(b)))
	s.kept.Add(1)
	return true, nil
}

// Get reads the document under content, verifying every chunk. A missing
// or corrupt chunk removes the manifest (if no other writer replaced it
// meanwhile) and returns an error wrapping ErrDamaged.
func (s *Store) Get(ctx context.Context, content string) (Document, error) {
	s.gets.Add(1)
	mk := s.manifestKey(content)
	raw, ok, err := s.b.Get(ctx, mk)
	if err != nil {
		return Document{}, err
	}
	if !ok {
		return Document{}, fmt.Errorf("document %s: %w", content, ErrNotFound)
	}
	s.read.Add(uint64(len(raw)))
	var m manifest
	damaged := func(format string, args ...any) (Document, error) {
		s.damaged.Add(1)
		bg := context.WithoutCancel(ctx)
		s.b.DelIfEqual(bg, mk, raw)
		// The copy's other chunks are garbage now: nothing names them.
		var keys []string
		for _, fe := range m.Files {
			for i := range fe.Chunks {
				keys = append(keys, s.chunkKey(content, m.Writer, fe.Name, i))
			}
		}
		if len(keys) > 0 && validKeyPart(m.Writer) {
			s.b.Del(bg, keys...)
		}
		return Document{}, fmt.Errorf("document %s: %w: %s (the manifest was removed; ingest the document again)", content, ErrDamaged, fmt.Sprintf(format, args...))
	}
	if err := json.Unmarshal(raw, &m); err != nil || m.Version != manifestVersion || !validKeyPart(m.Writer) {
		return damaged("unreadable manifest")
	}
	doc := Document{Meta: m.Meta}
	for _, fe := range m.Files {
		data := make([]byte, 0, fe.Size)
		for i, ce := range fe.Chunks {
			c, ok, err := s.b.Get(ctx, s.chunkKey(content, m.Writer, fe.Name, i))
			if err != nil {
				return Document{}, err
			}
			if !ok {
				return damaged("chunk %d of %s is missing (evicted?)", i, fe.Name)
			}
			s.read.Add(uint64(len(c)))
			sum := sha256.Sum256(c)
			if len(c) != ce.Size || hex.EncodeToString(sum[:]) != ce.SHA256 {
				return damaged("chunk %d of %s fails its checksum", i, fe.Name)
			}
			data = append(data, c...)
		}
		if len(data) != fe.Size {
			return damaged("%s has %d bytes, the manifest says %d", fe.Name, len(data), fe.Size)
		}
		doc.Files = append(doc.Files, File{Name: fe.Name, Data: data})
	}
	return doc, nil
}

// Meta returns the metadata of the document under content, from its
// manifest, without reading its chunks.
func (s *Store) Meta(ctx context.Context, content string) (json.RawMessage, error) {
	raw, ok, err := s.b.Get(ctx, s.manifestKey(content))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("document %s: %w", content, ErrNotFound)
	}
	var m manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("document %s: %w: unreadable manifest", content, ErrDamaged)
	}
	return m.Meta, nil
}

// SetName points a model's document id at a content address.
func (s *Store) SetName(ctx context.Context, model, id, content string) error {
	return s.b.Set(ctx, s.nameKey(model, id), []byte(content))
}

// Resolve returns the content address a model's document id points at.
func (s *Store) Resolve(ctx context.Context, model, id string) (string, error) {
	v, ok, err := s.b.Get(ctx, s.nameKey(model, id))
	if err != nil {
		return "", err
	}
	if !ok || !validKeyPart(string(v)) {
		return "", fmt.Errorf("document %s: %w", id, ErrNotFound)
	}
	return string(v), nil
}

// DeleteName removes a document id. The content stays for other ids that
// point at it; Redis's eviction policy reclaims what nothing reads.
func (s *Store) DeleteName(ctx context.Context, model, id string) error {
	return s.b.Del(ctx, s.nameKey(model, id))
}

// validKeyPart keeps key parts to characters that cannot split a key.
func validKeyPart(s string) bool {
	return s != "" && len(s) <= 200 && !strings.ContainsAny(s, ": \n\r\t/\\") && !strings.Contains(s, "..")
}

// ContentKey is a document's content address: the model, the tokens and
// every setting that changes the stored bytes, hashed. settings are
// "name=value" strings; their order does not matter.
func ContentKey(model, tokensHash string, settings ...string) string {
	ss := append([]string(nil), settings...)
	sort.Strings(ss)
	var b bytes.Buffer
	fmt.Fprintf(&b, "kvrecall-document-v1\nmodel=%s\ntokens=%s\n", model, tokensHash)
	for _, s := range ss {
		b.WriteString(s)
		b.WriteByte('\n')
	}
	sum := sha256.Sum256(b.Bytes())
	return hex.EncodeToString(sum[:])
}
