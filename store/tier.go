package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
)

// Tier is one place where a model's ingested documents are kept, by
// document id. It has two implementations:
//
//   - Local: this machine's disk, the data folder (runtime Options.DataDir,
//     serve --data), in the layout kvrecall has always written there.
//   - Shared: a Store (Redis, or a directory on a shared filesystem),
//     content-addressed and chunked, with an id -> content name index.
//
// runtime keeps documents in Local alone (no Options.Store), or in Local
// in front of Shared: read Local first and fall back to Shared, write
// both, and keep a document fetched from Shared in Local (docs/store.md).
//
// Both implementations give the same guarantees: a version's files are
// written first and its metadata last (the commit point), so a reader sees
// the previous version or the new one, whole, never a mix; a Put that fails
// leaves the previous version; every byte read is checked against a
// checksum (Shared: each chunk's sha256 in its manifest; Local: the file
// formats' own CRC32C, checked by their readers).
type Tier interface {
	// Put stores a version of document id and makes it id's current one.
	Put(ctx context.Context, id string, v Version) error
	// View calls fn with id's current version. The files are valid only
	// during fn (Local's are files on disk that a later Put may remove).
	// An id with no document is an error wrapping ErrNotFound.
	View(ctx context.Context, id string, fn func(Version) error) error
	// Delete removes id; ErrNotFound when there was nothing under it.
	Delete(ctx context.Context, id string) error
	// String names the tier in messages (no credentials).
	String() string
}

// Both implementations, as a compile-time fact.
var (
	_ Tier = (*Local)(nil)
	_ Tier = (*Shared)(nil)
)

// Version is one version of a document: its metadata (runtime's Info, as
// JSON; opaque to this package), its content address, and its files.
type Version struct {
	// Content is the document's content address (ContentKey): required by
	// Shared, which stores content once for every id naming it; Local
	// records it in the metadata when set.
	Content string
	Meta    json.RawMessage
	// Files: "pages" (the page file, required), "clusters" (optional) and
	// side files named like "probe-b64-r4-w256.kvr".
	Files []File
}

// File returns the version's file called name.
func (v Version) File(name string) (File, bool) {
	for _, f := range v.Files {
		if f.Name == name {
			return f, true
		}
	}
	return File{}, false
}

// The files of a version every tier knows.
const (
	PagesFile    = "pages"
	ClustersFile = "clusters"
)

// Bytes returns the file's content: Data, the output of Write, or the file
// at Path.
func (f File) Bytes() ([]byte, error) {
	switch {
	case f.Data != nil:
		return f.Data, nil
	case f.Write != nil:
		var b bytes.Buffer
		if err := f.Write(&b); err != nil {
			return nil, err
		}
		return b.Bytes(), nil
	case f.Path != "":
		return os.ReadFile(f.Path)
	}
	return []byte{}, nil
}

// writeTo streams the file's content to w, without holding it in memory
// when it is written by Write or read from Path.
func (f File) writeTo(w io.Writer) error {
	switch {
	case f.Data != nil:
		_, err := w.Write(f.Data)
		return err
	case f.Write != nil:
		return f.Write(w)
	case f.Path != "":
		r, err := os.Open(f.Path)
		if err != nil {
			return err
		}
		defer r.Close()
		_, err = io.Copy(w, r)
		return err
	}
	return nil
}

// Shared is the Tier on a Store: a version is stored once under its
// content address (Store.Put, manifest last, SET NX) and id names it in
// the model's name index (Store.SetName), the last Put of an id winning.
type Shared struct {
	S     *Store
	Model string // the model fingerprint that namespaces ids
}

// NewShared returns the Tier of model's documents in s.
func NewShared(s *Store, model string) *Shared { return &Shared{S: s, Model: model} }

func (t *Shared) String() string { return t.S.String() }

// Put stores v's content unless a copy is there already (another
// process's copy of the same content is kept), then points id at it.
func (t *Shared) Put(ctx context.Context, id string, v Version) error {
	if v.Content == "" {
		return fmt.Errorf("store %s: document %s has no content address", t.S, id)
	}
	doc := Document{Meta: v.Meta}
	for _, f := range v.Files {
		b, err := f.Bytes()
		if err != nil {
			return fmt.Errorf("document %s: %s: %w", id, f.Name, err)
		}
		doc.Files = append(doc.Files, File{Name: f.Name, Data: b})
	}
	if _, err := t.S.Put(ctx, v.Content, doc); err != nil {
		return err
	}
	return t.S.SetName(ctx, t.Model, id, v.Content)
}

// View resolves id through the name index and reads the content it names,
// every chunk verified. A damaged copy is ErrDamaged (and removed).
func (t *Shared) View(ctx context.Context, id string, fn func(Version) error) error {
	content, err := t.S.Resolve(ctx, t.Model, id)
	if err != nil {
		return err
	}
	return t.ViewContent(ctx, content, fn)
}

// ViewContent is View by content address (an ingest looking for the same
// text stored under any id).
func (t *Shared) ViewContent(ctx context.Context, content string, fn func(Version) error) error {
	doc, err := t.S.Get(ctx, content)
	if err != nil {
		return err
	}
	return fn(Version{Content: content, Meta: doc.Meta, Files: doc.Files})
}

// Resolve returns the content address id names.
func (t *Shared) Resolve(ctx context.Context, id string) (string, error) {
	return t.S.Resolve(ctx, t.Model, id)
}

// Delete removes id from the name index. The content stays for other ids
// that name it; Redis's eviction reclaims what nothing reads.
func (t *Shared) Delete(ctx context.Context, id string) error {
	if _, err := t.S.Resolve(ctx, t.Model, id); err != nil {
		return err
	}
	return t.S.DeleteName(ctx, t.Model, id)
}

// errNotFound wraps ErrNotFound for a document id.
func errNotFound(id string) error { return fmt.Errorf("document %s: %w", id, ErrNotFound) }

// IsNotFound says whether err means that a tier has no document under an id.
func IsNotFound(err error) bool { return errors.Is(err, ErrNotFound) }
