package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// Dir is Backend on a directory: one file per key, written atomically
// (temporary file, sync, rename). SetNX uses a hard link, which fails if
// the name exists, so it is atomic across processes on one filesystem.
type Dir struct {
	path string
	mu   sync.Mutex // DelIfEqual's read and remove, within this process
}

// OpenDir returns a Dir backend at path, creating it.
func OpenDir(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("store %s: %w", path, err)
	}
	return &Dir{path: path}, nil
}

// file maps a key to a file name; keys hold no '/' (validKeyPart) but ':'
// is awkward on some filesystems.
func (d *Dir) file(key string) string {
	return filepath.Join(d.path, string(bytes.ReplaceAll([]byte(key), []byte(":"), []byte("_"))))
}

func (d *Dir) Get(_ context.Context, key string) ([]byte, bool, error) {
	b, err := os.ReadFile(d.file(key))
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return b, true, nil
}

func (d *Dir) Set(_ context.Context, key string, v []byte) error {
	if err := atomicfile.WriteBytes(d.file(key), v, 0o600); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

func (d *Dir) SetNX(ctx context.Context, key string, v []byte) (bool, error) {
	// A name of its own: concurrent writers must not share it.
	var r [8]byte
	rand.Read(r[:])
	tmp := d.file(key) + ".new-" + hex.EncodeToString(r[:])
	if err := atomicfile.WriteBytes(tmp, v, 0o600); err != nil {
		return false, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	defer os.Remove(tmp)
	err := os.Link(tmp, d.file(key))
	if errors.Is(err, os.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return true, nil
}

func (d *Dir) DelIfEqual(ctx context.Context, key string, v []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur, ok, err := d.Get(ctx, key)
	if err != nil || !ok || !bytes.Equal(cur, v) {
		return err
	}
	return d.Del(ctx, key)
}

func (d *Dir) Del(_ context.Context, keys ...string) error {
	for _, k := range keys {
		if err := os.Remove(d.file(k)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
	}
	return nil
}

func (d *Dir) Ping(context.Context) error {
	if _, err := os.Stat(d.path); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

func (d *Dir) Close() error { return nil }
